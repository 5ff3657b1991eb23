/*
 * test_webhook_sign.c: Standard Webhooks v1 signatures: the specification's test vector,
 * several secrets, secret validation (never echoing the secret), verification failures.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "sinks/webhook_sign.h"

/* The Standard Webhooks reference vector (TestWebhookSign), checked with openssl as well. */
#define VEC_SECRET "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#define VEC_ID "msg_p5jXN8AQM9LWM0D4loKWxJek"
#define VEC_TS 1614265330
#define VEC_BODY "{\"test\": 2432232314}"
#define VEC_SIG "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
/* A second, 32-byte key. */
#define OTHER_SECRET "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="

static void test_vector(void **state)
{
    (void)state;
    const char *secrets[] = {VEC_SECRET};
    mc_error_t err;
    mc__webhook_signer_t *s = mc__webhook_signer_new(secrets, 1, &err);
    assert_non_null(s);
    char out[MC__WEBHOOK_SIG_HEADER_MAX];
    size_t len = 0;
    assert_int_equal(mc__webhook_sign(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY, strlen(VEC_BODY),
                                      out, &len, &err),
                     0);
    assert_string_equal(out, VEC_SIG);
    assert_int_equal(len, strlen(VEC_SIG));
    /* The same inputs verify; any changed byte does not. */
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS + 10,
                                        MC__WEBHOOK_TOLERANCE_SECS, &err),
                     0);
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, "{\"test\": 2432232315}",
                                        strlen(VEC_BODY), out, VEC_TS, 300, &err),
                     MC_EAUTH);
    assert_int_equal(mc__webhook_verify(s, "msg_x", 5, VEC_TS, VEC_BODY, strlen(VEC_BODY), out,
                                        VEC_TS, 300, &err),
                     MC_EAUTH);
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS + 1, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS, 300, &err),
                     MC_EAUTH);
    /* Timestamps outside the tolerance, either way. */
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS + 301, 300, &err),
                     MC_EAUTH);
    assert_non_null(strstr(err.message, "too old"));
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS - 301, 300, &err),
                     MC_EAUTH);
    assert_non_null(strstr(err.message, "too new"));
    /* Partial, missing, other-version signatures do not verify. */
    const char *bad_headers[] = {"", "v1,", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
                                 "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                                 "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="};
    for (size_t k = 0; k < sizeof bad_headers / sizeof bad_headers[0]; k++) {
        assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                            strlen(VEC_BODY), bad_headers[k], VEC_TS, 300, &err),
                         MC_EAUTH);
    }
    /* Among other entries (a future version, junk), a valid one is found. */
    assert_int_equal(mc__webhook_verify(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), "v1a,xyz  junk " VEC_SIG, VEC_TS, 300,
                                        &err),
                     0);
    mc__webhook_signer_destroy(s);
}

static void test_rotation_two_secrets(void **state)
{
    (void)state;
    const char *both[] = {VEC_SECRET, OTHER_SECRET};
    const char *old_only[] = {VEC_SECRET};
    const char *new_only[] = {OTHER_SECRET};
    mc__webhook_signer_t *s = mc__webhook_signer_new(both, 2, NULL);
    mc__webhook_signer_t *a = mc__webhook_signer_new(old_only, 1, NULL);
    mc__webhook_signer_t *b = mc__webhook_signer_new(new_only, 1, NULL);
    assert_non_null(s);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(mc__webhook_signer_count(s), 2);
    char out[MC__WEBHOOK_SIG_HEADER_MAX], one[MC__WEBHOOK_SIG_HEADER_MAX];
    size_t len = 0;
    assert_int_equal(mc__webhook_sign(s, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY, strlen(VEC_BODY),
                                      out, &len, NULL),
                     0);
    /* Both signatures, space-separated, in the order of the secrets. */
    assert_int_equal(len, 2 * 47 + 1);
    assert_memory_equal(out, VEC_SIG " ", 48);
    assert_int_equal(mc__webhook_sign(b, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY, strlen(VEC_BODY),
                                      one, NULL, NULL),
                     0);
    assert_string_equal(out + 48, one);
    /* A receiver knowing either secret verifies. */
    assert_int_equal(mc__webhook_verify(a, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS, 300, NULL),
                     0);
    assert_int_equal(mc__webhook_verify(b, VEC_ID, strlen(VEC_ID), VEC_TS, VEC_BODY,
                                        strlen(VEC_BODY), out, VEC_TS, 300, NULL),
                     0);
    /* The most secrets fit the documented buffer. */
    const char *eight[MC__WEBHOOK_MAX_SECRETS];
    for (int k = 0; k < MC__WEBHOOK_MAX_SECRETS; k++) {
        eight[k] = k % 2 ? VEC_SECRET : OTHER_SECRET;
    }
    mc__webhook_signer_t *e = mc__webhook_signer_new(eight, MC__WEBHOOK_MAX_SECRETS, NULL);
    assert_non_null(e);
    assert_int_equal(mc__webhook_sign(e, "x", 1, 0, "", 0, out, &len, NULL), 0);
    assert_int_equal(len, MC__WEBHOOK_MAX_SECRETS * 48 - 1);
    assert_true(len < MC__WEBHOOK_SIG_HEADER_MAX);
    mc__webhook_signer_destroy(e);
    mc__webhook_signer_destroy(s);
    mc__webhook_signer_destroy(a);
    mc__webhook_signer_destroy(b);
}

static void test_bad_secrets(void **state)
{
    (void)state;
    struct {
        const char *secret;
        const char *needle;
    } bad[] = {
        {"whsec_", "not valid base64"},
        {"", "whsec_<base64 key>"},
        {"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_<base64 key>"},
        {"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "not valid base64"},              /* length */
        {"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa!w", "not valid base64"},             /* alphabet */
        {"whsec_QUJDREVGR0hJSktMTU5PUA==", "24 to 64"},                             /* 16 bytes */
        {"whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZ=", "not valid base64"}, /* bits */
        {"whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3"
         "ODlBQkM=", /* 65 bytes */
         "longer than 64"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const char *secrets[] = {OTHER_SECRET, bad[k].secret};
        mc_error_t err;
        mc_error_clear(&err);
        mc__webhook_signer_t *s = mc__webhook_signer_new(secrets, 2, &err);
        if (s) {
            fail_msg("secret %zu accepted", k);
        }
        assert_int_equal(err.code, MC_ECONFIG);
        if (!strstr(err.message, bad[k].needle) || !strstr(err.message, "secret 2")) {
            fail_msg("secret %zu: message \"%s\"", k, err.message);
        }
        /* The secret itself never shows up in the message. */
        if (strlen(bad[k].secret) > 8) {
            assert_null(strstr(err.message, bad[k].secret + 6));
        }
    }
    mc_error_t err;
    assert_null(mc__webhook_signer_new(NULL, 0, &err));
    const char *nine[9] = {OTHER_SECRET, OTHER_SECRET, OTHER_SECRET, OTHER_SECRET, OTHER_SECRET,
                           OTHER_SECRET, OTHER_SECRET, OTHER_SECRET, OTHER_SECRET};
    assert_null(mc__webhook_signer_new(nine, 9, &err));
    mc__webhook_signer_destroy(NULL);
}

static void test_bad_ids(void **state)
{
    (void)state;
    const char *secrets[] = {VEC_SECRET};
    mc__webhook_signer_t *s = mc__webhook_signer_new(secrets, 1, NULL);
    char out[MC__WEBHOOK_SIG_HEADER_MAX];
    mc_error_t err;
    assert_int_equal(mc__webhook_sign(s, "a.b", 3, 1, "", 0, out, NULL, &err), MC_EINVAL);
    assert_int_equal(mc__webhook_sign(s, "", 0, 1, "", 0, out, NULL, &err), MC_EINVAL);
    assert_int_equal(mc__webhook_sign(s, "a", 1, -1, "", 0, out, NULL, &err), MC_EINVAL);
    /* An empty body is signed like any other. */
    assert_int_equal(mc__webhook_sign(s, "a", 1, 5, "", 0, out, NULL, &err), 0);
    assert_int_equal(mc__webhook_verify(s, "a", 1, 5, "", 0, out, 5, 300, &err), 0);
    mc__webhook_signer_destroy(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vector),
        cmocka_unit_test(test_rotation_two_secrets),
        cmocka_unit_test(test_bad_secrets),
        cmocka_unit_test(test_bad_ids),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
