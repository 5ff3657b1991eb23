/*
 * viewer.c: the live viewer page served at `/` (DESIGN §4.3).
 *
 * The page is src/daemon/viewer.html, turned into the byte array mcd_viewer_html at build
 * time (cmake/embed_file.cmake writes viewer_html.c into the build directory), so the binary
 * needs no file at run time and the page cannot drift from the daemon it ships with.
 *
 * Thread: any (returns a pointer to immutable static data). Invariant: the bytes are followed
 * by a NUL that `len` does not count.
 */
#include "viewer.h"

extern const unsigned char mcd_viewer_html[];
extern const size_t mcd_viewer_html_len;

const char *mcd_viewer_page(size_t *len)
{
    if (len) {
        *len = mcd_viewer_html_len;
    }
    return (const char *)mcd_viewer_html;
}
