/*
 * subject_template.h: names of Redis channels and keys and of NATS subjects, built from a
 * template such as "mongocast:{stream}:{recipient}" that is compiled once (at config load)
 * and rendered for every event into a caller's buffer, without allocating.
 *
 * Placeholders: {stream}, {recipient}, {db}, {coll}, {type} (the operationType of a change,
 * the kind name of a control event: "invalidate", "reset", ...). Every value is escaped, so
 * that no value can add a separator, a wildcard, a space or any other byte that would make
 * the name address another channel or subject:
 *   - bytes [A-Za-z0-9_-] are kept; every other byte (NUL and non-ASCII included) becomes
 *     %XX (two uppercase hex digits);
 *   - an empty or absent value renders as a lone "%" (which escaping never produces),
 *     except that a template token (the text between two separators) that is exactly
 *     {recipient} is left out, with one separator, when the recipient is empty or absent:
 *     "mongocast:{stream}:{recipient}" renders "mongocast:orders" for such an event.
 * Templates are checked when compiled: only known placeholders; no '%' and no control bytes
 * in literal text; inside one token, two placeholders need literal text between them with a
 * byte that escaping never produces (so a rendered name splits back into its values); for
 * NATS, every token is non-empty and the literal text has no whitespace, '*' or '>' (the
 * rendered subject is then a valid publish subject whatever the values). Rendering is
 * therefore injective in the values (two different value tuples never give the same name).
 *
 * Pure; a compiled template is immutable and may be rendered from any thread.
 */
#ifndef MC_SINKS_SUBJECT_TEMPLATE_H
#define MC_SINKS_SUBJECT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include "mongocast/error.h"
#include "mongocast/event.h"

/* Longest rendered name (bytes, without the NUL). NATS servers refuse protocol lines above
 * max_control_line (4 KiB by default), which must also hold the reply inbox and sizes. */
#define MC__SUBJECT_MAX 2048

/* Which naming rules apply (the separator and what is valid). */
typedef enum mc__subject_kind {
    MC__SUBJECT_REDIS = 0, /* separator ':'; a channel or key is binary-safe */
    MC__SUBJECT_NATS = 1,  /* separator '.'; tokens non-empty, no wildcards, no whitespace */
} mc__subject_kind_t;

/* The defaults of the sinks that use templates. */
#define MC__SUBJECT_DEFAULT_REDIS "mongocast:{stream}:{recipient}"
#define MC__SUBJECT_DEFAULT_NATS "mongocast.{stream}.{recipient}"

/* A value: `len` bytes at `p` (NUL bytes allowed); p == NULL means absent. */
typedef struct mc__bytes {
    const char *p;
    size_t len;
} mc__bytes_t;

typedef struct mc__subject_values {
    mc__bytes_t stream, recipient, db, coll, type;
} mc__subject_values_t;

typedef struct mc__subject_template mc__subject_template_t;

/* Compiles `text` (NUL-terminated). Errors (NULL, err filled with MC_ECONFIG and a message
 * naming the offending column): unknown or unterminated placeholder, a forbidden byte,
 * adjacent placeholders, an empty NATS token, a template that can render empty. */
mc__subject_template_t *mc__subject_template_new(const char *text, mc__subject_kind_t kind,
                                                 mc_error_t *err);
void mc__subject_template_destroy(mc__subject_template_t *t);

/* True when the template has {recipient} (names then differ per recipient). */
bool mc__subject_template_uses_recipient(const mc__subject_template_t *t);

/* Renders into out[0..cap) with a terminating NUL and returns the length in *len. Errors:
 * MC_ELIMIT when the name would be longer than cap - 1 or than MC__SUBJECT_MAX (a permanent
 * failure for that event: its values are too long). */
int mc__subject_template_render(const mc__subject_template_t *t, const mc__subject_values_t *v,
                                char *out, size_t cap, size_t *len, mc_error_t *err);

/* The values of an event (borrowed from it). */
void mc__subject_values_from_event(mc__subject_values_t *v, const mc_event_t *ev);

/* Escapes `len` bytes of `in` as described above into `out` (room for 3 * len bytes, no NUL
 * written) and returns the number of bytes written. */
size_t mc__subject_escape(const char *in, size_t len, char *out);

/* True when s[0..len) is a valid NATS publish subject: non-empty tokens separated by '.', no
 * whitespace or control byte, no '*' or '>' token. */
bool mc__nats_subject_valid(const char *s, size_t len);

#endif
