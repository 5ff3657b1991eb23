/*
 * mongocast/images.h: a collection's pre- and post-images (changeStreamPreAndPostImages),
 * asked about and turned on. Shared by the engine (ensure_images), `mongocast check` and
 * `mongocast enable-images`.
 *
 * Thread: any; each call blocks on MongoDB with the client it is given (a client is used by
 * one thread at a time).
 */
#ifndef MONGOCAST_IMAGES_H
#define MONGOCAST_IMAGES_H

#include <mongoc/mongoc.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mc_images_state {
    MC_IMAGES_ERROR = 0,         /* listCollections failed: see err */
    MC_IMAGES_NO_COLLECTION = 1, /* no such collection (or view) */
    MC_IMAGES_OFF = 2,
    MC_IMAGES_ON = 3,
} mc_images_state_t;

/* Whether db.coll has changeStreamPreAndPostImages enabled (listCollections). */
mc_images_state_t mc_images_state(mongoc_client_t *client, const char *db, const char *coll,
                                  bson_error_t *err);

/* collMod db.coll {changeStreamPreAndPostImages: {enabled: true}}. True on success. */
bool mc_images_enable(mongoc_client_t *client, const char *db, const char *coll, bson_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
