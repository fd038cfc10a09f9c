// The scheduler never moves a JLCM weight to another backend (issue #27).
//
// A fake accelerator backend, shaped like Metal/CUDA as ggml-backend's scheduler sees them: its own non-host
// buffer type, it claims every op, and it asks for every op to be offloaded (offload_op), as Metal does for
// large batches. It computes with the CPU kernels on its own memory, so a weight copied to it without its
// companion tensors (src[]) would be computed with the type's default codebook: a silently different number.
//
// For a weight in a CPU buffer (usage WEIGHTS) and an input batch of 64 columns, the check:
//   - a Q8_0 weight: the matmul IS offloaded to the fake device (the control: the mechanism is live);
//   - a JLCM2 weight with group codebooks and a permutation: the matmul stays on the CPU, and the result equals
//     the CPU-only result bit for bit.
// Prints one line per case; exits non-zero on any failure.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

// ---- the fake accelerator: memory of its own (not host, for the scheduler), CPU kernels ----

static ggml_backend_t g_cpu_inner;  // computes the fake device's graphs

struct fake_buffer { std::vector<uint8_t> mem; };

static void fb_free(ggml_backend_buffer_t b) { delete (fake_buffer *) b->context; }
static void * fb_base(ggml_backend_buffer_t b) {
    auto * fb = (fake_buffer *) b->context;
    // keep the base aligned like a device allocation
    return (void *) GGML_PAD((uintptr_t) fb->mem.data(), 64);
}
static void fb_memset(ggml_backend_buffer_t, ggml_tensor * t, uint8_t v, size_t off, size_t n) { memset((char *) t->data + off, v, n); }
static void fb_set(ggml_backend_buffer_t, ggml_tensor * t, const void * d, size_t off, size_t n) { memcpy((char *) t->data + off, d, n); }
static void fb_get(ggml_backend_buffer_t, const ggml_tensor * t, void * d, size_t off, size_t n) { memcpy(d, (const char *) t->data + off, n); }
static void fb_clear(ggml_backend_buffer_t b, uint8_t v) { memset(fb_base(b), v, b->size); }

static const ggml_backend_buffer_i fake_buffer_iface = {
    /* .free_buffer   = */ fb_free,
    /* .get_base      = */ fb_base,
    /* .init_tensor   = */ NULL,
    /* .memset_tensor = */ fb_memset,
    /* .set_tensor    = */ fb_set,
    /* .get_tensor    = */ fb_get,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ NULL,
    /* .clear         = */ fb_clear,
    /* .reset         = */ NULL,
};

static ggml_backend_buffer_type fake_buft_obj;
static ggml_backend_device fake_dev_obj;

static const char * fbt_name(ggml_backend_buffer_type_t) { return "FakeGPU"; }
static ggml_backend_buffer_t fbt_alloc(ggml_backend_buffer_type_t buft, size_t size) {
    auto * fb = new fake_buffer;
    fb->mem.resize(size + 64);
    return ggml_backend_buffer_init(buft, fake_buffer_iface, fb, size);
}
static size_t fbt_align(ggml_backend_buffer_type_t) { return 64; }
static bool fbt_is_host(ggml_backend_buffer_type_t) { return false; }

static const char * fd_name(ggml_backend_dev_t) { return "FakeGPU"; }
static void fd_memory(ggml_backend_dev_t, size_t * f, size_t * t) { *f = *t = (size_t) 1 << 30; }
static enum ggml_backend_dev_type fd_type(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_GPU; }
static void fd_props(ggml_backend_dev_t d, ggml_backend_dev_props * p) {
    memset(p, 0, sizeof(*p));
    p->name = fd_name(d);
    p->description = fd_name(d);
    p->type = GGML_BACKEND_DEVICE_TYPE_GPU;
}
static ggml_backend_buffer_type_t fd_buft(ggml_backend_dev_t) { return &fake_buft_obj; }
static bool fd_supports_op(ggml_backend_dev_t, const ggml_tensor *) { return true; }      // claims everything
static bool fd_supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t b) { return b == &fake_buft_obj; }
static bool fd_offload_op(ggml_backend_dev_t, const ggml_tensor * op) { return op->ne[1] >= 32; } // Metal's rule

static const char * fbk_name(ggml_backend_t) { return "FakeGPU"; }
static void fbk_free(ggml_backend_t b) { delete b; }
static ggml_status fbk_compute(ggml_backend_t, ggml_cgraph * g) { return ggml_backend_graph_compute(g_cpu_inner, g); }

static ggml_backend_t fake_backend_new() {
    fake_buft_obj.iface = { fbt_name, fbt_alloc, fbt_align, NULL, NULL, fbt_is_host };
    fake_buft_obj.device = &fake_dev_obj;
    fake_buft_obj.context = NULL;
    ggml_backend_device_i di = {};
    di.get_name = fd_name;
    di.get_description = fd_name;
    di.get_memory = fd_memory;
    di.get_type = fd_type;
    di.get_props = fd_props;
    di.get_buffer_type = fd_buft;
    di.supports_op = fd_supports_op;
    di.supports_buft = fd_supports_buft;
    di.offload_op = fd_offload_op;
    fake_dev_obj.iface = di;
    fake_dev_obj.reg = NULL;
    fake_dev_obj.context = NULL;
    ggml_backend_i bi = {};
    bi.get_name = fbk_name;
    bi.free = fbk_free;
    bi.graph_compute = fbk_compute;
    static ggml_guid guid = { 0x6a, 0x6c, 0x63, 0x6d, 0x66, 0x61, 0x6b, 0x65 };
    return new ggml_backend { &guid, bi, &fake_dev_obj, NULL };
}

// ---- the check ----

static const int K = 256, M = 64, N = 64, G = 5;

struct weights {
    ggml_context * ctx;
    ggml_backend_buffer_t buf;
    ggml_tensor * w;
};

static weights make_weights(ggml_type type, ggml_backend_t cpu) {
    ggml_init_params p = { ggml_tensor_overhead() * 8, NULL, true };
    weights r;
    r.ctx = ggml_init(p);
    r.w = ggml_new_tensor_2d(r.ctx, type, K, M);
    ggml_set_name(r.w, "w");
    ggml_tensor * cb = NULL, * bounds = NULL, * perm = NULL;
    if (ggml_is_jlcm(type)) {
        cb = ggml_new_tensor_2d(r.ctx, GGML_TYPE_I8, 1 << ggml_jlcm_bits(type), G);
        bounds = ggml_new_tensor_1d(r.ctx, GGML_TYPE_I32, G);
        perm = ggml_new_tensor_2d(r.ctx, GGML_TYPE_I32, M, 2);
        char err[256];
        if (!ggml_jlcm_link(r.w, cb, bounds, perm, err, sizeof(err))) {
            fprintf(stderr, "link: %s\n", err);
            exit(2);
        }
    }
    r.buf = ggml_backend_alloc_ctx_tensors(r.ctx, cpu);
    ggml_backend_buffer_set_usage(r.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    std::mt19937 rng(42);
    std::vector<float> f(K * M);
    for (auto & x : f) x = std::uniform_real_distribution<float>(-1, 1)(rng);
    std::vector<uint8_t> q(ggml_row_size(type, K) * M);
    ggml_quantize_chunk(type, f.data(), q.data(), 0, M, K, NULL);
    ggml_backend_tensor_set(r.w, q.data(), 0, q.size());
    if (cb) {
        std::vector<int8_t> c(ggml_nelements(cb));
        for (auto & x : c) x = (int8_t) ((int) (rng() % 255) - 127);
        ggml_backend_tensor_set(cb, c.data(), 0, c.size());
        int32_t b[G] = { 7, 20, 33, 50, M };
        ggml_backend_tensor_set(bounds, b, 0, sizeof(b));
        std::vector<int32_t> pv(2 * M);
        std::iota(pv.begin(), pv.begin() + M, 0);
        std::shuffle(pv.begin(), pv.begin() + M, rng);
        for (int i = 0; i < M; ++i) pv[M + pv[i]] = i;
        ggml_backend_tensor_set(perm, pv.data(), 0, pv.size() * sizeof(int32_t));
    }
    return r;
}

// out = w @ x through a scheduler over `backends`; returns out and which backend computed it
static std::vector<float> run(ggml_tensor * w, std::vector<ggml_backend_t> backends, const char ** where) {
    ggml_init_params p = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), NULL, true };
    ggml_context * ctx = ggml_init(p);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);
    ggml_set_name(x, "x");
    ggml_set_input(x);
    ggml_tensor * out = ggml_mul_mat(ctx, w, x);
    ggml_set_name(out, "out");
    ggml_set_output(out);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_backend_sched_t sched = ggml_backend_sched_new(backends.data(), NULL, (int) backends.size(), 64, false, true);
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        fprintf(stderr, "alloc failed\n");
        exit(2);
    }
    std::vector<float> xv(K * N);
    std::mt19937 rng(7);
    for (auto & v : xv) v = std::uniform_real_distribution<float>(-1, 1)(rng);
    ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * sizeof(float));
    if (ggml_backend_sched_graph_compute(sched, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        exit(2);
    }
    *where = ggml_backend_name(ggml_backend_sched_get_tensor_backend(sched, out));
    std::vector<float> r(M * N);
    ggml_backend_tensor_get(out, r.data(), 0, r.size() * sizeof(float));
    ggml_backend_sched_free(sched);
    ggml_free(ctx);
    return r;
}

int main() {
    ggml_backend_t cpu = ggml_backend_cpu_init();
    g_cpu_inner = ggml_backend_cpu_init();
    ggml_backend_t fake = fake_backend_new();
    int failures = 0;

    for (ggml_type type : { GGML_TYPE_Q8_0, GGML_TYPE_JLCM2, GGML_TYPE_JLCM3, GGML_TYPE_JLCM4 }) {
        weights wt = make_weights(type, cpu);
        const char * where_ref, * where;
        std::vector<float> ref = run(wt.w, { cpu }, &where_ref);
        std::vector<float> got = run(wt.w, { fake, cpu }, &where);
        double max_diff = 0;
        for (size_t i = 0; i < ref.size(); ++i) max_diff = std::max(max_diff, (double) std::abs(ref[i] - got[i]));
        const bool jlcm = ggml_is_jlcm(type);
        // the control must be offloaded; JLCM must stay on the CPU and match exactly
        const bool ok = jlcm ? (strcmp(where, "FakeGPU") != 0 && max_diff == 0.0)
                             : (strcmp(where, "FakeGPU") == 0 && max_diff < 1e-3);
        printf("%-6s weight in a CPU buffer, 64-column batch: computed on %s, max |diff| vs CPU-only %.3g: %s\n",
               ggml_type_name(type), where, max_diff, ok ? "OK" : "FAIL");
        failures += !ok;
        ggml_backend_buffer_free(wt.buf);
        ggml_free(wt.ctx);
    }
    ggml_backend_free(fake);
    ggml_backend_free(g_cpu_inner);
    ggml_backend_free(cpu);
    return failures ? 1 : 0;
}
