/*
 * json_writer.h: one-pass BSON -> MongoDB Extended JSON v2 writer (internal).
 *
 * Output is byte-identical to libbson 1.23's bson_as_relaxed_extended_json() and
 * bson_as_canonical_extended_json() (same spacing, same escaping, same number spelling, same
 * refusals), or, in MC__JSON_COMPACT mode, to that text with the spaces outside strings
 * removed (what mongocast sends), but written straight into one growable buffer instead of
 * through libbson's per-character string building. Where libbson returns NULL (invalid UTF-8 in a
 * string, a key or a regex; corrupt BSON), the writer returns MC__JSON_EINVALID.
 *
 * Any thread; a buffer belongs to one thread at a time. Buffers are allocated with
 * bson_malloc/bson_realloc so a stolen text may be released with bson_free().
 */
#ifndef MC_JSON_WRITER_H
#define MC_JSON_WRITER_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* RELAXED or CANONICAL, optionally OR-ed with COMPACT: the same text without the optional
 * whitespace libbson puts around punctuation (`{"a":1}` instead of `{ "a" : 1 }`); exactly
 * libbson's text with every space outside a string removed, so still valid Extended JSON
 * that parses to the same document. */
typedef enum mc__json_mode {
    MC__JSON_RELAXED = 0,
    MC__JSON_CANONICAL = 1,
    MC__JSON_COMPACT = 2,
    MC__JSON_RELAXED_COMPACT = MC__JSON_RELAXED | MC__JSON_COMPACT,
    MC__JSON_CANONICAL_COMPACT = MC__JSON_CANONICAL | MC__JSON_COMPACT,
} mc__json_mode_t;

enum {
    MC__JSON_OK = 0,
    MC__JSON_EINVALID = -1, /* libbson would refuse the input (its renderer returns NULL) */
    MC__JSON_ETOOBIG = -2,  /* the output would exceed the buffer's maximum */
};

/* Default maximum output size. The worst-case expansion of BSON into Extended JSON is about
 * 15x (an `undefined` element with an empty key: 2 bytes -> `"" : { "$undefined" : true }, `),
 * so a 16 MiB document (MongoDB's limit) fits in 256 MiB; 1 GiB leaves room for change events
 * that carry both images. */
#define MC__JSON_MAX_DEFAULT ((size_t)1 << 30)

typedef struct mc__json_buf {
    char *data; /* bson_malloc'ed; NUL-terminated by mc__json_buf_steal() */
    size_t len;
    size_t cap;
    size_t max; /* output larger than this fails with MC__JSON_ETOOBIG */
    int err;    /* sticky: the first error, MC__JSON_OK while none */
} mc__json_buf_t;

/* Prepares an empty buffer with room for `reserve` bytes (0: allocate on first write) and a
 * maximum of `max` bytes (0: MC__JSON_MAX_DEFAULT). */
void mc__json_buf_init(mc__json_buf_t *b, size_t reserve, size_t max);

/* Prepares an empty buffer over caller-owned memory `mem` of `cap` bytes (cap >= 1): output
 * longer than cap - 1 bytes fails with MC__JSON_ETOOBIG, so the buffer never reallocates; do
 * not destroy or steal it. For short texts rendered on a hot path without an allocation. */
void mc__json_buf_init_fixed(mc__json_buf_t *b, char *mem, size_t cap);

/* Frees the buffer's memory; the buffer may be initialised again. */
void mc__json_buf_destroy(mc__json_buf_t *b);

/* Makes room for `n` more bytes (+1 for a final NUL). Slow path of the inline appends. */
bool mc__json_buf_grow(mc__json_buf_t *b, size_t n);

static inline bool mc__json_buf_reserve(mc__json_buf_t *b, size_t n)
{
    return (b->cap - b->len > n) || mc__json_buf_grow(b, n);
}

static inline void mc__json_buf_append(mc__json_buf_t *b, const void *p, size_t n)
{
    if (mc__json_buf_reserve(b, n)) {
        memcpy(b->data + b->len, p, n);
        b->len += n;
    }
}

#define MC__JSON_LIT(b, lit) mc__json_buf_append((b), (lit), sizeof(lit) - 1)

/* NUL-terminates and hands over the text (release with bson_free()), its length in *len when
 * len is not NULL; the buffer is left empty. Returns NULL (and frees the text) when an error
 * was recorded. */
char *mc__json_buf_steal(mc__json_buf_t *b, size_t *len);

/* Appends `n` bytes of `s` as a quoted JSON string escaped exactly as libbson's
 * bson_utf8_escape_for_json() with a given length: `"` and `\` get a backslash, \b \f \n \r
 * \t their short escapes, other bytes below 0x20 (including NUL) \u00XX with lowercase hex,
 * everything else (0x7F, '/', multi-byte UTF-8) is copied. Invalid UTF-8, and the overlong
 * NUL C0 80 that libbson's validator lets through but its escaper refuses, give
 * MC__JSON_EINVALID. Returns the buffer's error state. */
int mc__json_write_string(mc__json_buf_t *b, const char *s, size_t n);

/* Appends `doc` as libbson renders a whole document (bson_as_*_extended_json): "{ }" when it
 * is empty (or its first type byte is 0), else "{ k : v, ... }" ("{}" and "{k:v,...}" in
 * compact mode). */
int mc__json_write_document(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode);

/* Appends `doc` as libbson renders a document value nested in a document at depth
 * `parent_depth` (0: the value sits in a top-level document): an empty document is "{  }",
 * and at parent depth 200 or more libbson prints "{ ... }" instead of the contents. */
int mc__json_write_embedded(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode,
                            int parent_depth);

/* The same without the element at offset `skip` of `doc` (bson_iter_t.off of one of its
 * top-level elements; 0: none), as libbson would render the document without that element:
 * how a message leaves out what it carries elsewhere (the change's _id, docs/protocol.md). */
int mc__json_write_embedded_except(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode,
                                   int parent_depth, uint32_t skip);

/* Renders `doc` into a new bson_malloc'ed string exactly like bson_as_relaxed_extended_json()
 * or bson_as_canonical_extended_json() (or that text compacted); NULL where libbson returns NULL,
 * or when the output would exceed `max` bytes (0: MC__JSON_MAX_DEFAULT). `err`, when not NULL,
 * receives the MC__JSON_* code. */
char *mc__json_render(const bson_t *doc, mc__json_mode_t mode, size_t max, size_t *len, int *err);

/* Length of the strictly valid UTF-8 character at `s` (1 to 4, `left` bytes available), or 0
 * when none starts there (an invalid or truncated sequence, an overlong form, a surrogate). */
size_t mc__json_utf8_char_len(const uint8_t *s, size_t left);

/* Appends `n` bytes of JSON text `s` without the whitespace outside its strings (space, tab,
 * CR, LF): libbson's spacing -> the compact form. `s` must be well-formed JSON text (string
 * escapes are honoured); the tests use it to derive the expected compact output. */
void mc__json_append_compacted(mc__json_buf_t *b, const char *s, size_t n);

#endif
