/*
 * json_writer.c: BSON -> Extended JSON v2 (relaxed and canonical) in one pass, byte-identical
 * to libbson 1.23's bson_as_relaxed_extended_json() / bson_as_canonical_extended_json(), or,
 * in compact mode (what mongocast sends), to that text without the spaces outside strings.
 *
 * Runs on whichever thread renders (the dispatch thread for events); no shared state. Why it
 * exists: libbson validates every string, then escapes it one character at a time through
 * bson_string_t (a strlen and a size check per output byte) and builds every nested document
 * in a string of its own before copying it into its parent. Here every value is appended
 * straight into one buffer sized from the BSON length, runs of plain ASCII are found eight
 * bytes at a time and copied with memcpy, and UTF-8 is validated while it is copied.
 *
 * Invariants that keep the output identical to libbson (each one mirrors a libbson 1.23
 * detail, see tests/unit/test_json_writer.c for the differential tests):
 *   - elements are walked with bson_iter_next(), so exactly the same BSON is accepted; any
 *     corruption it reports, an element key that is not strict UTF-8 (arrays included, though
 *     their keys are not printed), or a string libbson cannot escape makes the whole
 *     rendering fail (libbson returns NULL), never a partial text;
 *   - a nested document or array whose bytes bson_init_static() refuses prints nothing at all
 *     after its key (libbson skips the visit), and one nested 200 levels deep prints "{ ... }";
 *   - a whole document is "{ }" when empty (or when its first type byte is 0), a nested empty
 *     one "{  }" / "[  ]";
 *   - the scope of a code-with-scope is rendered as a whole document again (depth restarts);
 *     chains of scopes deeper than MAX_SCOPE_NEST are handed to libbson for that one value,
 *     which bounds this writer's own recursion;
 *   - doubles are printed as "%.20g" (+ ".0" when that looks like an integer); the fast path
 *     only takes values whose "%.20g" spelling is exact by construction.
 */
#include "json_writer.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#define MAX_RECURSION 200 /* libbson 1.23's BSON_MAX_RECURSION */
#define MAX_SCOPE_NEST 4

typedef struct writer {
    mc__json_buf_t *b;
    bool canonical;
    bool compact;   /* libbson's text without the spaces outside strings */
    int scope_nest; /* code-with-scope scopes currently open */
} writer_t;

static writer_t writer_of(mc__json_buf_t *b, mc__json_mode_t mode)
{
    return (writer_t){.b = b,
                      .canonical = (mode & MC__JSON_CANONICAL) != 0,
                      .compact = (mode & MC__JSON_COMPACT) != 0};
}

/* Punctuation: libbson's spelling, or without its spaces in compact mode. The literals hold
 * no space inside a quoted part, so dropping every space is exact. */
static void lit(writer_t *w, const char *s, size_t n)
{
    if (!w->compact) {
        mc__json_buf_append(w->b, s, n);
        return;
    }
    if (!mc__json_buf_reserve(w->b, n)) {
        return;
    }
    char *o = w->b->data + w->b->len;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != ' ') {
            *o++ = s[i];
        }
    }
    w->b->len = (size_t)(o - w->b->data);
}

#define W_LIT(w, l) lit((w), (l), sizeof(l) - 1)

static const char hex_digits[] = "0123456789abcdef";

/* ---- Buffer ------------------------------------------------------------------------------- */

void mc__json_buf_init(mc__json_buf_t *b, size_t reserve, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max ? max : MC__JSON_MAX_DEFAULT;
    if (b->max > SIZE_MAX / 4) {
        b->max = SIZE_MAX / 4; /* keeps the capacity arithmetic below free of overflow */
    }
    b->err = MC__JSON_OK;
    if (reserve) {
        mc__json_buf_grow(b, reserve > b->max ? b->max : reserve);
    }
}

void mc__json_buf_init_fixed(mc__json_buf_t *b, char *mem, size_t cap)
{
    /* grow() never needs more than len + n + 1 <= max + 1 = cap bytes: no realloc. */
    b->data = mem;
    b->len = 0;
    b->cap = cap;
    b->max = cap - 1;
    b->err = MC__JSON_OK;
}

void mc__json_buf_destroy(mc__json_buf_t *b)
{
    bson_free(b->data);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->err = MC__JSON_OK;
}

bool mc__json_buf_grow(mc__json_buf_t *b, size_t n)
{
    if (b->err) {
        return false;
    }
    if (n > b->max || b->len > b->max - n) {
        b->err = MC__JSON_ETOOBIG;
        return false;
    }
    size_t need = b->len + n + 1; /* + the final NUL; <= max + 1 */
    if (need <= b->cap) {
        return true;
    }
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) {
        cap = cap > (b->max + 1) / 2 ? b->max + 1 : cap * 2;
    }
    /* bson_realloc, not realloc: the text is handed to code that frees it with bson_free. */
    b->data = bson_realloc(b->data, cap);
    b->cap = cap;
    return true;
}

char *mc__json_buf_steal(mc__json_buf_t *b, size_t *len)
{
    if (!b->err && mc__json_buf_reserve(b, 0)) {
        char *s = b->data;
        s[b->len] = '\0';
        if (len) {
            *len = b->len;
        }
        b->data = NULL;
        b->len = 0;
        b->cap = 0;
        return s;
    }
    if (len) {
        *len = 0;
    }
    mc__json_buf_destroy(b);
    return NULL;
}

static void fail(writer_t *w, int err)
{
    if (!w->b->err) {
        w->b->err = err;
    }
}

/* ---- Strings ------------------------------------------------------------------------------ */

static inline bool is_plain(uint8_t c)
{
    return (uint8_t)(c - 0x20) < 0x60 && c != '"' && c != '\\';
}

/* True when none of the 8 bytes needs attention: no byte < 0x20, >= 0x80, '"' or '\'. The
 * classic "has a byte less than n" / "has a zero byte" tests are exact as yes/no answers. */
static inline bool word_plain(const uint8_t *p)
{
    const uint64_t ones = 0x0101010101010101ULL;
    const uint64_t highs = 0x8080808080808080ULL;
    uint64_t x;
    memcpy(&x, p, sizeof(x));
    uint64_t q = x ^ (ones * '"');
    uint64_t s = x ^ (ones * '\\');
    uint64_t t = ((x - ones * 0x20) & ~x) | ((q - ones) & ~q) | ((s - ones) & ~s) | x;
    return (t & highs) == 0;
}

/* Length (2..4) of the well-formed UTF-8 sequence at s, or 0. Well-formed is what libbson's
 * validator accepts and its escaper can re-encode: shortest form, no surrogates, at most
 * U+10FFFF. (The overlong NUL C0 80 passes libbson's validator but makes its escaper fail, so
 * it is refused here too.) */
static inline size_t utf8_seq(const uint8_t *s, size_t left)
{
    uint8_t c = s[0];
    if (c >= 0xC2 && c <= 0xDF) {
        return left >= 2 && (s[1] & 0xC0) == 0x80 ? 2 : 0;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (left < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) {
            return 0;
        }
        uint32_t cp =
            ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (uint32_t)(s[2] & 0x3F);
        return cp >= 0x800 && (cp & 0xFFFFF800u) != 0xD800 ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF7) {
        if (left < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) {
            return 0;
        }
        uint32_t cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
                      ((uint32_t)(s[2] & 0x3F) << 6) | (uint32_t)(s[3] & 0x3F);
        return cp >= 0x10000 && cp <= 0x10FFFF ? 4 : 0;
    }
    return 0;
}

size_t mc__json_utf8_char_len(const uint8_t *s, size_t left)
{
    return left ? (s[0] < 0x80 ? 1 : utf8_seq(s, left)) : 0;
}

/* bson_utf8_validate(s, n, allow_null = true): NUL bytes and C0 80 are accepted. */
static bool utf8_valid_allow_null(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
        } else if (s[i] == 0xC0 && n - i >= 2 && s[i + 1] == 0x80) {
            i += 2;
        } else {
            size_t k = utf8_seq(s + i, n - i);
            if (!k) {
                return false;
            }
            i += k;
        }
    }
    return true;
}

/* bson_utf8_validate(key, strlen(key), allow_null = false) for keys that are not printed
 * (array indexes); the key has no NUL byte in it. */
static bool key_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t k = utf8_seq(s + i, n - i);
        if (!k) {
            return false;
        }
        i += k;
    }
    return true;
}

static void put_escaped(writer_t *w, const uint8_t *s, size_t n)
{
    mc__json_buf_t *b = w->b;
    if (!mc__json_buf_reserve(b, n + 2)) {
        return;
    }
    b->data[b->len++] = '"';
    size_t i = 0;
    for (;;) {
        size_t j = i;
        while (n - j >= 8 && word_plain(s + j)) {
            j += 8;
        }
        while (j < n && is_plain(s[j])) {
            j++;
        }
        if (j > i) {
            mc__json_buf_append(b, s + i, j - i);
            i = j;
        }
        if (i >= n) {
            break;
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            char esc[6] = {'\\', 0, 0, 0, 0, 0};
            size_t k = 2;
            switch (c) {
            case '"': esc[1] = '"'; break;
            case '\\': esc[1] = '\\'; break;
            case '\b': esc[1] = 'b'; break;
            case '\f': esc[1] = 'f'; break;
            case '\n': esc[1] = 'n'; break;
            case '\r': esc[1] = 'r'; break;
            case '\t': esc[1] = 't'; break;
            default: /* the other control characters, NUL included */
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex_digits[c >> 4];
                esc[5] = hex_digits[c & 15];
                k = 6;
                break;
            }
            mc__json_buf_append(b, esc, k);
            i++;
        } else {
            size_t k = utf8_seq(s + i, n - i);
            if (!k) {
                fail(w, MC__JSON_EINVALID);
                return;
            }
            mc__json_buf_append(b, s + i, k);
            i += k;
        }
    }
    mc__json_buf_append(b, "\"", 1);
}

int mc__json_write_string(mc__json_buf_t *b, const char *s, size_t n)
{
    writer_t w = writer_of(b, MC__JSON_RELAXED);
    put_escaped(&w, (const uint8_t *)s, n);
    return b->err;
}

void mc__json_append_compacted(mc__json_buf_t *b, const char *s, size_t n)
{
    if (!mc__json_buf_reserve(b, n)) {
        return;
    }
    char *o = b->data + b->len;
    bool in_string = false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_string) {
            *o++ = c;
            if (c == '\\' && i + 1 < n) {
                *o++ = s[++i];
            } else if (c == '"') {
                in_string = false;
            }
        } else if (c == '"') {
            in_string = true;
            *o++ = c;
        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            *o++ = c;
        }
    }
    b->len = (size_t)(o - b->data);
}

/* ---- Numbers, dates, identifiers ------------------------------------------------------------ */

/* Writes v in decimal ending at `end`; returns the first character. */
static char *fmt_u64(char *end, uint64_t v)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

static void put_i64(writer_t *w, int64_t v)
{
    char tmp[24];
    char *end = tmp + sizeof(tmp);
    char *p = fmt_u64(end, v < 0 ? 0 - (uint64_t)v : (uint64_t)v);
    if (v < 0) {
        *--p = '-';
    }
    mc__json_buf_append(w->b, p, (size_t)(end - p));
}

static void put_u32(writer_t *w, uint32_t v)
{
    char tmp[16];
    char *end = tmp + sizeof(tmp);
    char *p = fmt_u64(end, v);
    mc__json_buf_append(w->b, p, (size_t)(end - p));
}

/* libbson prints a finite double with "%.20g" and appends ".0" when the result holds only
 * digits and '-'. A double whose magnitude is below 2^53 and which is a multiple of 2^-j for
 * j <= 4 is M * 2^-j with M < 2^53, i.e. exactly (M * 5^j) / 10^j: at most 19 significant
 * digits and a decimal exponent between -2 and 15, which "%.20g" prints exactly, in fixed
 * notation, without trailing zeros (M is odd for the smallest j, so the last digit is 5). Those
 * are written here; everything else goes through snprintf like libbson. */
static void put_double_digits(writer_t *w, double d)
{
    static const uint64_t pow5[] = {1, 5, 25, 125, 625};
    static const uint64_t pow10[] = {1, 10, 100, 1000, 10000};
    char tmp[64];
    double a = fabs(d);
    if (a < 9007199254740992.0) {
        for (int j = 0; j <= 4; j++) {
            double s = a * (double)(1u << j); /* exact: a power-of-two scale */
            if (s != floor(s)) {
                continue;
            }
            uint64_t n = (uint64_t)s * pow5[j];
            char *end = tmp + sizeof(tmp);
            char *p = end;
            if (j == 0) {
                *--p = '0';
                *--p = '.';
            } else {
                uint64_t frac = n % pow10[j];
                for (int k = 0; k < j; k++) {
                    *--p = (char)('0' + frac % 10);
                    frac /= 10;
                }
                *--p = '.';
            }
            p = fmt_u64(p, n / pow10[j]);
            if (signbit(d)) {
                *--p = '-';
            }
            mc__json_buf_append(w->b, p, (size_t)(end - p));
            return;
        }
    }
    int n = snprintf(tmp, sizeof(tmp), "%.20g", d);
    if (n <= 0 || (size_t)n >= sizeof(tmp)) {
        fail(w, MC__JSON_EINVALID); /* cannot happen for a double; never print a cut text */
        return;
    }
    mc__json_buf_append(w->b, tmp, (size_t)n);
    if (strspn(tmp, "0123456789-") == (size_t)n) {
        W_LIT(w, ".0");
    }
}

static void put_double(writer_t *w, double d)
{
    bool finite = !(d != d || d * 0 != 0); /* libbson's own test */
    if (!w->canonical && finite) {
        put_double_digits(w, d);
        return;
    }
    W_LIT(w, "{ \"$numberDouble\" : \"");
    if (d != d) {
        W_LIT(w, "NaN");
    } else if (!finite) {
        if (d > 0) {
            W_LIT(w, "Infinity");
        } else {
            W_LIT(w, "-Infinity");
        }
    } else {
        put_double_digits(w, d);
    }
    W_LIT(w, "\" }");
}

static void put_2digits(char *p, int v)
{
    p[0] = (char)('0' + v / 10);
    p[1] = (char)('0' + v % 10);
}

/* libbson's relaxed date for ms >= 0: gmtime_r + strftime("%Y-%m-%dT%H:%M:%S"), then
 * ".mmmZ" or "Z". The civil date comes from the day count with the usual era arithmetic
 * (proleptic Gregorian, as gmtime); years past 9999 print all their digits, as %Y does. */
static void put_iso_date(writer_t *w, int64_t ms)
{
    int64_t secs = ms / 1000;
    int msec = (int)(ms % 1000);
    int64_t days = secs / 86400;
    int sod = (int)(secs % 86400);

    int64_t z = days + 719468; /* days since 0000-03-01 */
    int64_t era = z / 146097;  /* z >= 0 here */
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int day = (int)(doy - (153 * mp + 2) / 5 + 1);
    int month = (int)(mp < 10 ? mp + 3 : mp - 9);
    int64_t year = yoe + era * 400 + (month <= 2);

    char tmp[48];
    char *end = tmp + 24;
    char *p = fmt_u64(end, (uint64_t)year);
    char *q = end;
    *q++ = '-';
    put_2digits(q, month);
    q += 2;
    *q++ = '-';
    put_2digits(q, day);
    q += 2;
    *q++ = 'T';
    put_2digits(q, sod / 3600);
    q += 2;
    *q++ = ':';
    put_2digits(q, sod / 60 % 60);
    q += 2;
    *q++ = ':';
    put_2digits(q, sod % 60);
    q += 2;
    if (msec) {
        *q++ = '.';
        *q++ = (char)('0' + msec / 100);
        put_2digits(q, msec % 100);
        q += 2;
    }
    *q++ = 'Z';
    mc__json_buf_append(w->b, p, (size_t)(q - p));
}

static void put_oid_hex(writer_t *w, const bson_oid_t *oid)
{
    char hex[24];
    for (int i = 0; i < 12; i++) {
        hex[2 * i] = hex_digits[oid->bytes[i] >> 4];
        hex[2 * i + 1] = hex_digits[oid->bytes[i] & 15];
    }
    mc__json_buf_append(w->b, hex, sizeof(hex));
}

static void put_base64(writer_t *w, const uint8_t *s, size_t n)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    mc__json_buf_t *b = w->b;
    if (n > SIZE_MAX / 2 || !mc__json_buf_reserve(b, (n + 2) / 3 * 4)) {
        fail(w, MC__JSON_ETOOBIG);
        return;
    }
    char *o = b->data + b->len;
    size_t i = 0;
    for (; n - i >= 3; i += 3) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        o[0] = alphabet[v >> 18];
        o[1] = alphabet[(v >> 12) & 63];
        o[2] = alphabet[(v >> 6) & 63];
        o[3] = alphabet[v & 63];
        o += 4;
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        o[0] = alphabet[v >> 18];
        o[1] = alphabet[(v >> 12) & 63];
        o[2] = '=';
        o[3] = '=';
        o += 4;
    } else if (n - i == 2) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8);
        o[0] = alphabet[v >> 18];
        o[1] = alphabet[(v >> 12) & 63];
        o[2] = alphabet[(v >> 6) & 63];
        o[3] = '=';
        o += 4;
    }
    b->len = (size_t)(o - b->data);
}

/* ---- Documents ---------------------------------------------------------------------------- */

static void put_container(writer_t *w, bson_iter_t *it, bool array, int depth, uint32_t skip);
static void put_top_document(writer_t *w, const uint8_t *data, size_t len);

/* The one value this writer hands to libbson: it is rendered as the only element (empty key)
 * of a document of its own and cut out of libbson's "{ "" : VALUE }". Exact for the types it
 * is used for, whose rendering does not depend on the depth. */
static void put_value_by_libbson(writer_t *w, const bson_iter_t *it)
{
    size_t vlen = it->next_off - it->d1;
    size_t total = 4 + 1 + 1 + vlen + 1;
    if (total > BSON_MAX_SIZE) {
        fail(w, MC__JSON_EINVALID);
        return;
    }
    uint8_t *raw = bson_malloc(total);
    uint32_t le = BSON_UINT32_TO_LE((uint32_t)total);
    memcpy(raw, &le, 4);
    raw[4] = (uint8_t)bson_iter_type(it);
    raw[5] = 0;
    memcpy(raw + 6, it->raw + it->d1, vlen);
    raw[total - 1] = 0;
    bson_t tmp;
    char *s = NULL;
    size_t n = 0;
    if (bson_init_static(&tmp, raw, total)) {
        s = w->canonical ? bson_as_canonical_extended_json(&tmp, &n)
                         : bson_as_relaxed_extended_json(&tmp, &n);
    }
    static const char prefix[] = "{ \"\" : ";
    if (s && n >= sizeof(prefix) - 1 + 2 && memcmp(s, prefix, sizeof(prefix) - 1) == 0 &&
        memcmp(s + n - 2, " }", 2) == 0) {
        if (w->compact) {
            mc__json_append_compacted(w->b, s + sizeof(prefix) - 1, n - (sizeof(prefix) - 1) - 2);
        } else {
            mc__json_buf_append(w->b, s + sizeof(prefix) - 1, n - (sizeof(prefix) - 1) - 2);
        }
    } else {
        fail(w, MC__JSON_EINVALID);
    }
    bson_free(s);
    bson_free(raw);
}

static void put_regex_options(writer_t *w, const char *options)
{
    /* libbson prints the flags it knows, in this order, each once. */
    static const char sorted[] = "ilmsux";
    char out[sizeof(sorted)];
    size_t n = 0;
    for (const char *c = sorted; *c; c++) {
        if (strchr(options, *c)) {
            out[n++] = *c;
        }
    }
    mc__json_buf_append(w->b, out, n);
}

static void put_code_with_scope(writer_t *w, const bson_iter_t *it)
{
    uint32_t code_len = 0, scope_len = 0;
    const uint8_t *scope = NULL;
    const char *code = bson_iter_codewscope(it, &code_len, &scope_len, &scope);
    bson_iter_t probe;
    if (!bson_iter_init_from_data(&probe, scope, scope_len)) {
        /* libbson validates the code, then skips a scope it cannot open: nothing printed. */
        if (!utf8_valid_allow_null((const uint8_t *)code, code_len)) {
            fail(w, MC__JSON_EINVALID);
        }
        return;
    }
    if (w->scope_nest >= MAX_SCOPE_NEST) {
        put_value_by_libbson(w, it);
        return;
    }
    W_LIT(w, "{ \"$code\" : ");
    put_escaped(w, (const uint8_t *)code, code_len);
    W_LIT(w, ", \"$scope\" : ");
    w->scope_nest++;
    put_top_document(w, scope, scope_len);
    w->scope_nest--;
    W_LIT(w, " }");
}

/* One element's value, inside a container of depth `depth`. */
static void put_value(writer_t *w, const bson_iter_t *it, int depth)
{
    mc__json_buf_t *b = w->b;
    bool canonical = w->canonical;
    switch (bson_iter_type(it)) {
    case BSON_TYPE_DOUBLE: put_double(w, bson_iter_double(it)); return;
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *s = bson_iter_utf8(it, &len);
        put_escaped(w, (const uint8_t *)s, len);
        return;
    }
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: {
        bool array = bson_iter_type(it) == BSON_TYPE_ARRAY;
        const uint8_t *data = NULL;
        uint32_t len = 0;
        if (array) {
            bson_iter_array(it, &len, &data);
        } else {
            bson_iter_document(it, &len, &data);
        }
        bson_iter_t child;
        if (!data || !bson_iter_init_from_data(&child, data, len)) {
            return; /* libbson's bson_init_static() failed: it prints nothing */
        }
        if (depth >= MAX_RECURSION) {
            W_LIT(w, "{ ... }"); /* for arrays too, as libbson does */
            return;
        }
        put_container(w, &child, array, depth + 1, 0);
        return;
    }
    case BSON_TYPE_BINARY: {
        bson_subtype_t subtype = BSON_SUBTYPE_BINARY;
        uint32_t len = 0;
        const uint8_t *data = NULL;
        bson_iter_binary(it, &subtype, &len, &data);
        W_LIT(w, "{ \"$binary\" : { \"base64\" : \"");
        put_base64(w, data, len);
        char tail[] = "\", \"subType\" : \"XX\" } }";
        tail[16] = hex_digits[((unsigned)subtype >> 4) & 15];
        tail[17] = hex_digits[(unsigned)subtype & 15];
        W_LIT(w, tail);
        return;
    }
    case BSON_TYPE_UNDEFINED: W_LIT(w, "{ \"$undefined\" : true }"); return;
    case BSON_TYPE_OID:
        W_LIT(w, "{ \"$oid\" : \"");
        put_oid_hex(w, bson_iter_oid(it));
        W_LIT(w, "\" }");
        return;
    case BSON_TYPE_BOOL:
        if (bson_iter_bool(it)) {
            W_LIT(w, "true");
        } else {
            W_LIT(w, "false");
        }
        return;
    case BSON_TYPE_DATE_TIME: {
        int64_t ms = bson_iter_date_time(it);
        if (canonical || ms < 0) {
            W_LIT(w, "{ \"$date\" : { \"$numberLong\" : \"");
            put_i64(w, ms);
            W_LIT(w, "\" } }");
        } else {
            W_LIT(w, "{ \"$date\" : \"");
            put_iso_date(w, ms);
            W_LIT(w, "\" }");
        }
        return;
    }
    case BSON_TYPE_NULL: W_LIT(w, "null"); return;
    case BSON_TYPE_REGEX: {
        const char *options = NULL;
        const char *regex = bson_iter_regex(it, &options);
        W_LIT(w, "{ \"$regularExpression\" : { \"pattern\" : ");
        put_escaped(w, (const uint8_t *)regex, strlen(regex));
        W_LIT(w, ", \"options\" : \"");
        put_regex_options(w, options);
        W_LIT(w, "\" } }");
        return;
    }
    case BSON_TYPE_DBPOINTER: {
        uint32_t len = 0;
        const char *coll = NULL;
        const bson_oid_t *oid = NULL;
        bson_iter_dbpointer(it, &len, &coll, &oid);
        /* libbson validates the whole name (NULs allowed) but escapes it as a C string, so a
         * name with a NUL in it is cut there. */
        if (!utf8_valid_allow_null((const uint8_t *)coll, len)) {
            fail(w, MC__JSON_EINVALID);
            return;
        }
        W_LIT(w, "{ \"$dbPointer\" : { \"$ref\" : ");
        put_escaped(w, (const uint8_t *)coll, strlen(coll));
        W_LIT(w, ", \"$id\" : { \"$oid\" : \"");
        put_oid_hex(w, oid);
        W_LIT(w, "\" } } }");
        return;
    }
    case BSON_TYPE_CODE: {
        uint32_t len;
        const char *code = bson_iter_code(it, &len);
        W_LIT(w, "{ \"$code\" : ");
        put_escaped(w, (const uint8_t *)code, len);
        W_LIT(w, " }");
        return;
    }
    case BSON_TYPE_SYMBOL: {
        uint32_t len;
        const char *sym = bson_iter_symbol(it, &len);
        W_LIT(w, "{ \"$symbol\" : ");
        put_escaped(w, (const uint8_t *)sym, len);
        W_LIT(w, " }");
        return;
    }
    case BSON_TYPE_CODEWSCOPE: put_code_with_scope(w, it); return;
    case BSON_TYPE_INT32:
        if (canonical) {
            W_LIT(w, "{ \"$numberInt\" : \"");
            put_i64(w, bson_iter_int32(it));
            W_LIT(w, "\" }");
        } else {
            put_i64(w, bson_iter_int32(it));
        }
        return;
    case BSON_TYPE_TIMESTAMP: {
        uint32_t t, i;
        bson_iter_timestamp(it, &t, &i);
        W_LIT(w, "{ \"$timestamp\" : { \"t\" : ");
        put_u32(w, t);
        W_LIT(w, ", \"i\" : ");
        put_u32(w, i);
        W_LIT(w, " } }");
        return;
    }
    case BSON_TYPE_INT64:
        if (canonical) {
            W_LIT(w, "{ \"$numberLong\" : \"");
            put_i64(w, bson_iter_int64(it));
            W_LIT(w, "\" }");
        } else {
            put_i64(w, bson_iter_int64(it));
        }
        return;
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        char str[BSON_DECIMAL128_STRING];
        bson_iter_decimal128(it, &dec);
        bson_decimal128_to_string(&dec, str);
        W_LIT(w, "{ \"$numberDecimal\" : \"");
        mc__json_buf_append(b, str, strlen(str));
        W_LIT(w, "\" }");
        return;
    }
    case BSON_TYPE_MAXKEY: W_LIT(w, "{ \"$maxKey\" : 1 }"); return;
    case BSON_TYPE_MINKEY: W_LIT(w, "{ \"$minKey\" : 1 }"); return;
    case BSON_TYPE_EOD:
    default: fail(w, MC__JSON_EINVALID); return; /* bson_iter_next() never yields these */
    }
}

/* A document or array at depth `depth` (0 for a whole document), walked with `it`, fresh from
 * bson_iter_init_from_data() (the same checks as libbson's bson_init_static()). The element
 * at offset `skip` (bson_iter_t.off; 0: none) is left out, as if the document lacked it. */
static void put_container(writer_t *w, bson_iter_t *it_in, bool array, int depth, uint32_t skip)
{
    mc__json_buf_t *b = w->b;
    bson_iter_t it = *it_in;
    if (array) {
        W_LIT(w, "[ ");
    } else {
        W_LIT(w, "{ ");
    }
    bool first = true;
    while (bson_iter_next(&it)) {
        if (skip && it.off == skip) {
            continue;
        }
        const uint8_t *key = (const uint8_t *)bson_iter_key(&it);
        uint32_t key_len = bson_iter_key_len(&it);
        if (!first) {
            W_LIT(w, ", ");
        }
        first = false;
        if (array) {
            if (!key_valid(key, key_len)) {
                fail(w, MC__JSON_EINVALID);
                return;
            }
        } else {
            put_escaped(w, key, key_len);
            W_LIT(w, " : ");
        }
        put_value(w, &it, depth);
        if (b->err) {
            return;
        }
    }
    if (it.err_off) {
        fail(w, MC__JSON_EINVALID); /* corrupt, or a type bson_iter_next() does not know */
        return;
    }
    if (array) {
        W_LIT(w, " ]");
    } else {
        W_LIT(w, " }");
    }
}

static void put_top_document(writer_t *w, const uint8_t *data, size_t len)
{
    /* bson_empty0(): libbson looks at the first type byte only. */
    if (len == 5 || (len > 5 && data[4] == 0)) {
        W_LIT(w, "{ }");
        return;
    }
    bson_iter_t it;
    if (!bson_iter_init_from_data(&it, data, len)) {
        fail(w, MC__JSON_EINVALID);
        return;
    }
    put_container(w, &it, false, 0, 0);
}

int mc__json_write_document(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode)
{
    writer_t w = writer_of(b, mode);
    put_top_document(&w, bson_get_data(doc), doc->len);
    return b->err;
}

int mc__json_write_embedded(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode,
                            int parent_depth)
{
    return mc__json_write_embedded_except(b, doc, mode, parent_depth, 0);
}

int mc__json_write_embedded_except(mc__json_buf_t *b, const bson_t *doc, mc__json_mode_t mode,
                                   int parent_depth, uint32_t skip)
{
    writer_t w = writer_of(b, mode);
    bson_iter_t it;
    if (!bson_iter_init_from_data(&it, bson_get_data(doc), doc->len)) {
        return b->err; /* libbson prints nothing for a document it cannot open */
    }
    if (parent_depth >= MAX_RECURSION) {
        W_LIT(&w, "{ ... }");
    } else {
        put_container(&w, &it, false, parent_depth + 1, skip);
    }
    return b->err;
}

char *mc__json_render(const bson_t *doc, mc__json_mode_t mode, size_t max, size_t *len, int *err)
{
    mc__json_buf_t b;
    /* Typical documents grow by a third in relaxed mode (keys and strings are copied, a few
     * bytes of punctuation per element); canonical wraps every number. */
    size_t guess = (size_t)doc->len + (size_t)doc->len / ((mode & MC__JSON_CANONICAL) ? 1 : 2);
    mc__json_buf_init(&b, guess + 64, max);
    mc__json_write_document(&b, doc, mode);
    if (err) {
        *err = b.err;
    }
    return mc__json_buf_steal(&b, len);
}
