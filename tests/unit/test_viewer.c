/*
 * test_viewer.c: the embedded live viewer page (src/daemon/viewer.c + the generated
 * viewer_html.c): the bytes served are exactly src/daemon/viewer.html, NUL-terminated, and the
 * page keeps its promises that can be checked statically: self-contained (no external
 * scripts, styles, fonts or images), a CSP that forbids other origins, and no HTML sinks
 * (innerHTML and friends) that event data could reach.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "viewer.h"

#define VIEWER_SOURCE MC_TEST_DATA_DIR "/../../../src/daemon/viewer.html"

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, 4096, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

static void test_page_is_viewer_html(void **state)
{
    (void)state;
    size_t len = 0;
    const char *page = mcd_viewer_page(&len);
    assert_non_null(page);
    assert_true(len > 1000);
    /* NUL right after the bytes, and none inside: usable as a C string of the same length. */
    assert_int_equal(page[len], '\0');
    assert_int_equal(strlen(page), len);
    assert_ptr_equal(mcd_viewer_page(NULL), page);

    size_t src_len = 0;
    char *src = read_file(VIEWER_SOURCE, &src_len);
    assert_non_null(src);
    assert_int_equal(src_len, len);
    assert_memory_equal(src, page, len);
    free(src);
    assert_int_equal(strncmp(page, "<!DOCTYPE html>", 15), 0);
}

static void test_page_is_self_contained(void **state)
{
    (void)state;
    const char *page = mcd_viewer_page(NULL);
    /* Nothing fetched from elsewhere: no absolute URLs at all, no external script or sheet. */
    static const char *const forbidden[] = {
        "http://", "https://", "<script src", "rel=\"stylesheet\"", "@import", "url(",
        "@font-face",
        /* HTML sinks: event data must only ever reach textContent / text nodes. */
        ".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(",
        "new Function",
    };
    for (size_t i = 0; i < sizeof(forbidden) / sizeof(forbidden[0]); i++) {
        if (strstr(page, forbidden[i])) {
            fail_msg("viewer.html contains \"%s\"", forbidden[i]);
        }
    }
    assert_non_null(strstr(page, "Content-Security-Policy"));
    assert_non_null(strstr(page, "default-src 'none'"));
    /* The page talks to the protocol of DESIGN §4.3. */
    assert_non_null(strstr(page, "/v1/streams"));
    assert_non_null(strstr(page, "new WebSocket("));
    assert_non_null(strstr(page, "\"since\""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_page_is_viewer_html),
        cmocka_unit_test(test_page_is_self_contained),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
