// Dump the logits of a fixed token sequence through llama.cpp's C API, the same program built for
// x86 and for aarch64 (tools/check_arm.py compares the two on the same GGUF).
//
//   llamacpp_logits MODEL.gguf OUT.bin N_THREADS FLASH_ATTN(0|1)
//
// The sequence exercises the three ways ggml-cpu runs a weight matmul: a 24-token prompt (logits at
// every position: gemm, where the low-rank B factors read a strided view of the stacked A·x), a
// 7-token batch (4 rows through the repacked gemm, 3 through gemv), then 8 single tokens (gemv).
// OUT.bin: int32 n_rows, int32 n_vocab, int32 phase[n_rows] (0 prompt, 1 batch of 7, 2 single),
// float32 logits[n_rows][n_vocab]. llama.cpp's lines about repacked weights go to stderr.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void log_repack(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN || strstr(text, "repack") || strstr(text, "REPACK")) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.bin N_THREADS FLASH_ATTN(0|1)\n", argv[0]);
        return 2;
    }
    const int n_threads = atoi(argv[3]);
    llama_log_set(log_repack, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "%s: llama.cpp could not load it\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 128;
    cp.n_batch = cp.n_ubatch = 64;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.flash_attn_type = atoi(argv[4]) ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "could not create a context\n"); return 1; }

    const int sizes[] = {24, 7, 1, 1, 1, 1, 1, 1, 1, 1};
    std::vector<int32_t> phase;
    std::vector<float> logits;
    llama_batch batch = llama_batch_init(64, 0, 1);
    int pos = 0;
    for (int n : sizes) {
        batch.n_tokens = n;
        for (int j = 0; j < n; ++j) {
            batch.token[j] = 3 + ((pos + j) * 37 + 11) % (n_vocab - 3);  // fixed ids, the same everywhere
            batch.pos[j] = pos + j;
            batch.n_seq_id[j] = 1;
            batch.seq_id[j][0] = 0;
            batch.logits[j] = 1;
        }
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed at position %d\n", pos); return 1; }
        for (int j = 0; j < n; ++j) {
            const float * l = llama_get_logits_ith(ctx, j);
            logits.insert(logits.end(), l, l + n_vocab);
            phase.push_back(n == 24 ? 0 : n == 7 ? 1 : 2);
        }
        pos += n;
    }

    FILE * f = fopen(argv[2], "wb");
    if (!f) { fprintf(stderr, "cannot write %s\n", argv[2]); return 1; }
    const int32_t head[2] = {(int32_t) phase.size(), n_vocab};
    fwrite(head, 4, 2, f);
    fwrite(phase.data(), 4, phase.size(), f);
    fwrite(logits.data(), sizeof(float), logits.size(), f);
    fclose(f);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
