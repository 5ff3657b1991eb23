/*
 * config_internal.h: the YAML layer under the configuration loader (config_yaml.c), shared
 * with config.c and the unit tests.
 *
 * config_yaml.c turns YAML text into a small tree of positioned nodes: libyaml's event API
 * gives the line and column of every node, ${VAR} substitution has already been applied to
 * every scalar value (never to mapping keys), duplicate keys, aliases, unsupported tags,
 * over-deep nesting and over-large input have been refused. config.c then types the tree
 * against its option tables. Any thread; no global state (getenv is the only outside input).
 */
#ifndef MC_CONFIG_INTERNAL_H
#define MC_CONFIG_INTERNAL_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#define MC__CFG_MAX_BYTES (4u * 1024u * 1024u)  /* configuration text */
#define MC__CFG_MAX_DEPTH 64                    /* nested mappings/sequences */
#define MC__CFG_MAX_NODES 200000                /* scalars + collections */
#define MC__CFG_MAX_VALUE (1024u * 1024u)       /* one scalar after ${VAR} substitution */
#define MC__CFG_MAX_TOTAL (16u * 1024u * 1024u) /* all scalars after substitution */
#define MC__CFG_MAX_STREAMS 1000                /* each one is a watcher thread */
#define MC__CFG_MAX_SINKS 1000

typedef enum mc__cfg_kind {
    MC__CFG_SCALAR = 0,
    MC__CFG_SEQ,
    MC__CFG_MAP,
} mc__cfg_kind_t;

typedef struct mc__cfg_node {
    mc__cfg_kind_t kind;
    int line; /* 1-based */
    int col;  /* 1-based */
    /* scalars: NUL-terminated; never holds an embedded NUL (the parser refuses them) */
    char *text;
    size_t len;
    bool plain; /* untagged plain scalar: typed as null/bool/int/float, else a string */
    /* collections: a mapping holds key, value, key, value, ... (keys are always scalars) */
    struct mc__cfg_node **items;
    size_t n_items;
    size_t cap_items;
} mc__cfg_node_t;

typedef enum mc__cfg_type {
    MC__CFG_NULL = 0,
    MC__CFG_BOOL,
    MC__CFG_INT,
    MC__CFG_DOUBLE,
    MC__CFG_STRING,
} mc__cfg_type_t;

typedef struct mc__cfg_scalar {
    mc__cfg_type_t type;
    bool b;
    int64_t i;
    double d;
    bool overflow; /* MC__CFG_INT whose text does not fit in int64_t */
} mc__cfg_scalar_t;

/* Parses `len` bytes of YAML into *root (a tree the caller frees with mc__cfg_node_free).
 * `name` prefixes error messages. Returns 0, or MC_ECONFIG with "NAME:LINE:COL: message". */
int mc__cfg_parse(const char *yaml, size_t len, const char *name, mc__cfg_node_t **root,
                  mc_error_t *err);

/* NULL-safe; frees the whole subtree. */
void mc__cfg_node_free(mc__cfg_node_t *node);

/* Replaces ${VAR}, ${VAR:-default} and $$ in `in`. On success *out is malloc'd (NUL-terminated)
 * and 0 is returned; on failure -1 and a message (without position) in `msg`. */
int mc__cfg_interpolate(const char *in, size_t len, char **out, size_t *out_len, char *msg,
                        size_t msg_size);

/* YAML core-schema typing of a scalar node (quoted or tagged scalars are always strings). */
void mc__cfg_scalar_type(const mc__cfg_node_t *node, mc__cfg_scalar_t *out);

/* Optimal-string-alignment (Damerau-Levenshtein) distance, capped at `cap` + 1. */
size_t mc__cfg_edit_distance(const char *a, const char *b, size_t cap);

/* Checks a stream pipeline's stage order and its per-subscriber stages (pipeline_check.c):
 * 0, or MC_ECONFIG with the message and *bad_stage the index of the offending stage. */
int mc__stream_pipeline_check(const bson_t *pipeline, size_t *bad_stage, mc_error_t *err);

/* Walks the option tables: calls `fn` with the dotted name of every option ("server.listen",
 * "streams.*.history") so that tests can check the documentation covers each of them. */
void mc__cfg_each_option(void (*fn)(const char *dotted_name, void *ud), void *ud);

#endif
