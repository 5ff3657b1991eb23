/*
 * mongocast.h: the umbrella header of libmongocast. Includes every public header and nothing
 * private. Embedders include only this file:
 *
 *     #include <mongocast.h>
 *
 * error.h   mc_error_t, MC_E* status codes
 * log.h     log handler, levels, rate-limited logging
 * config.h  the YAML configuration (mc_config_t)
 * event.h   mc_event_t: one immutable, refcounted, normalised event
 * filter.h  MongoDB query matching (subscriber filters, $var stages, $expr)
 * pipeline.h aggregation expressions, projections and per-document stages
 * sink.h    mc_sink_type_t: the sink vtable; built-in stdout and memory sinks
 * engine.h  mc_engine_t: watchers, dispatch, checkpoints
 *
 * Call mongoc_init() once before creating an engine and mongoc_cleanup() at exit, as with
 * any libmongoc program; the library does neither for you (it may be embedded in a program
 * that already does).
 */
#ifndef MONGOCAST_H
#define MONGOCAST_H

#include "mongocast/error.h"
#include "mongocast/log.h"
#include "mongocast/config.h"
#include "mongocast/identity.h"
#include "mongocast/event.h"
#include "mongocast/filter.h"
#include "mongocast/images.h"
#include "mongocast/pipeline.h"
#include "mongocast/sink.h"
#include "mongocast/engine.h"

#define MC_VERSION_STRING "0.1.0"

#endif
