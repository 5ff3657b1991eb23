/*
 * viewer.h: the live viewer page served at `/` (DESIGN §4.3).
 *
 * One self-contained HTML page (inline CSS and JS), compiled into the daemon from
 * src/daemon/viewer.html. Thread: any; the page is immutable static data.
 */
#ifndef MONGOCAST_DAEMON_VIEWER_H
#define MONGOCAST_DAEMON_VIEWER_H

#include <stddef.h>

/* The page (text/html; charset=utf-8) and its length in `*len` (when not NULL). The bytes are
 * static and followed by a NUL that `*len` does not count. Never NULL. */
const char *mcd_viewer_page(size_t *len);

#endif
