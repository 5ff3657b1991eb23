/*
 * mongocast/identity.h: who an event is for, and who a subscriber is, as one comparable value.
 *
 * An event's recipient (a value in the change, or found through a lookup collection), a
 * subscriber's identity claim (a JSON value in its token) and a lookup key are all compared
 * by one rule. A value is first brought to its canonical identity; two values are the same
 * identity exactly when their canonical identities are byte-equal:
 *
 *   string      its UTF-8 bytes, every byte counts (an embedded NUL too: "u3\0x" is not "u3");
 *               a string is never equal to a number or an ObjectId, even with the same
 *               spelling ("5" is not 5, "64a7...99" is not ObjectId("64a7...99"))
 *   integer     int32, int64, double and decimal128 holding the same integer are one identity
 *               (5 == Int64(5) == 5.0 == Decimal128("5"), as in MongoDB's own $eq); the value
 *               must fit in a signed 64-bit integer. A number with a fraction, NaN or an
 *               infinity is not an identity
 *   ObjectId    its 12 bytes
 *   binary      its subtype and bytes (a UUID is binary subtype 4)
 *
 * Nothing else is an identity: null, missing, booleans, dates, timestamps, documents, regular
 * expressions, and arrays (an array does not mean "several recipients"). A string that is not
 * valid UTF-8, or a canonical form longer than MC_IDENTITY_MAX bytes, is not one either. An
 * event whose recipient is not an identity is delivered to admins only.
 *
 * The canonical form is a tag byte ('s', 'i', 'o', 'b') followed by the payload (the string's
 * bytes; the integer as 8 big-endian bytes; the 12 ObjectId bytes; the subtype then the
 * bytes). It is stable and may be stored or hashed.
 *
 * Thread: pure functions, any thread.
 */
#ifndef MONGOCAST_IDENTITY_H
#define MONGOCAST_IDENTITY_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Longest canonical identity (tag included). */
#define MC_IDENTITY_MAX 1024
/* Longest rendering of an identity by mc_identity_json() (a string of MC_IDENTITY_MAX - 1
 * control characters, each escaped as \u00XX, plus quotes and the NUL). */
#define MC_IDENTITY_JSON_MAX (6 * MC_IDENTITY_MAX + 8)

typedef struct mc_identity {
    uint32_t len; /* 0: no identity */
    uint8_t bytes[MC_IDENTITY_MAX];
} mc_identity_t;

/* Brings `v` to its canonical identity. Returns true and fills *out, or returns false (and
 * sets out->len to 0) when the value is not an identity. */
bool mc_identity_from_value(const bson_value_t *v, mc_identity_t *out);

/* The same for the value an iterator points at. */
bool mc_identity_from_iter(const bson_iter_t *it, mc_identity_t *out);

/* Two canonical identities (given as bytes and length) are the same identity. False when
 * either is empty. */
bool mc_identity_equal(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len);

/* Writes the identity as a compact relaxed Extended JSON value, as mongocast's messages spell
 * it ("u1", 5, {"$oid":"..."}, {"$binary":{...}}), NUL-terminated, into `out`
 * (at least MC_IDENTITY_JSON_MAX bytes). Returns its length, or 0 for an empty or malformed
 * identity. Byte-equal identities give byte-equal text and different ones different text,
 * so the text is itself a canonical key. */
size_t mc_identity_json(const uint8_t *id, size_t len, char *out);

#ifdef __cplusplus
}
#endif
#endif
