// Opens a GGUF file with ggml's GGUF reader and loads its tensor data; exit 0 only if that succeeds.
#include "ggml.h"
#include "gguf.h"

#include <stdio.h>

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]);
        return 1;
    }
    struct ggml_context * ctx = NULL;
    struct gguf_init_params params = { /*.no_alloc =*/ false, /*.ctx =*/ &ctx };
    struct gguf_context * gguf = gguf_init_from_file(argv[1], params);
    if (!gguf) {
        fprintf(stderr, "refused: %s\n", argv[1]);
        return 3;
    }
    printf("loaded %lld tensors\n", (long long) gguf_get_n_tensors(gguf));
    gguf_free(gguf);
    ggml_free(ctx);
    return 0;
}
