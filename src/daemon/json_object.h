/*
 * json_object.h: strict parsing of one JSON object from untrusted input (query values, JWT
 * segments) into BSON, and escaping text into the JSON the daemon writes itself (refusals,
 * control messages).
 *
 * libbson's bson_init_from_json() silently ignores a second document after the first
 * ({"a":1}{"$where":...} parses as {"a":1}) and turns a top-level array into a document;
 * both are ambiguities an attacker can play with, so this wrapper accepts exactly one JSON
 * object and nothing after it but whitespace. Extended JSON ($oid, $date, ...) is still
 * interpreted, as libbson does. An integer literal int64 cannot hold becomes a double (as in
 * MongoDB's relaxed Extended JSON) instead of being refused or wrapped around by libbson's
 * reader. Any thread; no global state.
 */
#ifndef MONGOCAST_DAEMON_JSON_OBJECT_H
#define MONGOCAST_DAEMON_JSON_OBJECT_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

/* Parses `len` bytes of `json` into `out` (initialised here; destroy it with bson_destroy()
 * on success only). Returns 0, or -1 when the input is not exactly one JSON object (too
 * deep, malformed, trailing data, invalid UTF-8, NUL bytes); `out` is then left
 * uninitialised-equivalent (nothing to free). */
int mcd_json_object_parse(const char *json, size_t len, bson_t *out);

/* True when some key of `doc` occurs twice at the top level. */
bool mcd_json_has_duplicate_keys(const bson_t *doc);

/* Appends `s` as the body of a JSON string (without quotes) to out[*n..cap) and keeps `out`
 * NUL-terminated; what does not fit (with 7 bytes to spare) is left out. */
void mcd_json_escape(char *out, size_t cap, size_t *n, const char *s);

#endif
