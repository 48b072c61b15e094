/* Preloaded into tritonserver (LD_PRELOAD) by stack/triton_launcher.py: puts the Triton admin key into the
 * arguments main() reads, from the environment, so that it never appears in /proc/<pid>/cmdline (readable by
 * every local user; /proc/<pid>/environ is readable by the process's own user only).
 *
 * Why a shim: tritonserver 2.51 reads --grpc-restricted-protocol / --http-restricted-api from its argv only
 * (no flag file, no config file, no environment variable). glibc calls a preloaded library's constructors
 * with (argc, argv, envp) before main(); replacing an argv[i] pointer changes what main() parses, while the
 * kernel keeps showing the original bytes, which hold only the placeholder.
 *
 * Fails closed: a placeholder with no key in the environment stops the process (else the literal placeholder,
 * which is public, would become the key). The launcher checks the shim is mapped into the process. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLACEHOLDER "@TRITON_ADMIN_KEY@"
#define VARIABLE "TRITON_ADMIN_KEY"

__attribute__((constructor)) static void fill_admin_key(int argc, char **argv, char **envp) {
    (void)envp;
    const char *key = getenv(VARIABLE);
    size_t placeholder_size = strlen(PLACEHOLDER);
    for (int i = 1; i < argc; i++) {
        char *at = strstr(argv[i], PLACEHOLDER);
        if (at == NULL) {
            continue;
        }
        if (key == NULL || key[0] == '\0') {
            fprintf(stderr, "argv_secret: %s in the arguments but %s is not set\n", PLACEHOLDER, VARIABLE);
            exit(78);
        }
        size_t head = (size_t)(at - argv[i]), key_size = strlen(key), tail = strlen(at + placeholder_size);
        char *filled = malloc(head + key_size + tail + 1);
        if (filled == NULL) {
            abort();
        }
        memcpy(filled, argv[i], head);
        memcpy(filled + head, key, key_size);
        memcpy(filled + head + key_size, at + placeholder_size, tail + 1);
        argv[i] = filled;
    }
    /* Not passed on to the Python-backend stubs this server starts. */
    unsetenv(VARIABLE);
}
