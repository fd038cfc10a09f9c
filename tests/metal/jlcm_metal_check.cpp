// Runs the JLCM Metal kernels (ggml-metal/kernels/jlcm.metal, compiled as C++ through metal_emu.h) on
// one case written by tests/test_metal.py, with the arguments and grid the Metal host code
// (ggml_metal_op_jlcm in ggml-metal-ops.cpp) would give them.
//
//   jlcm-metal-check DIR BITS ROWS COLS N N_GROUPS HAS_PERM N_IDS
//
// DIR holds w.bin (packed rows), cb.bin + bounds.bin (if N_GROUPS > 0), perm.bin (if HAS_PERM), x.bin
// (f32 [N][COLS]) and ids.bin (i32 [N_IDS]); get_rows.f32, mul_mv.f32 and mul_mm.f32 are written there.
// Every buffer is its own exact-size allocation, so AddressSanitizer sees any read past a tensor.
#include "jlcm.metal"

#include <cstdio>
#include <cstdlib>
#include <string>

static std::unique_ptr<char[]> read_file(const std::string & path, size_t & size) {
    FILE * f = fopen(path.c_str(), "rb");
    if (!f) {
        size = 0;
        return nullptr;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    std::unique_ptr<char[]> buf(new char[size]);
    if (fread(buf.get(), 1, size, f) != size) {
        fprintf(stderr, "error: cannot read %s\n", path.c_str());
        exit(1);
    }
    fclose(f);
    return buf;
}

static void write_file(const std::string & path, const float * data, size_t n) {
    FILE * f = fopen(path.c_str(), "wb");
    if (!f || fwrite(data, sizeof(float), n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "error: cannot write %s\n", path.c_str());
        exit(1);
    }
}

int main(int argc, char ** argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s DIR BITS ROWS COLS N N_GROUPS HAS_PERM N_IDS\n", argv[0]);
        return 1;
    }
    const std::string dir = argv[1];
    const int bits = atoi(argv[2]), rows = atoi(argv[3]), cols = atoi(argv[4]), n = atoi(argv[5]);
    const int n_groups = atoi(argv[6]), has_perm = atoi(argv[7]), n_ids = atoi(argv[8]);
    const size_t block_size = bits == 2 ? sizeof(block_jlcm2) : bits == 3 ? sizeof(block_jlcm3) : sizeof(block_jlcm4);

    size_t sw, scb, sb, sp, sx, si;
    auto w      = read_file(dir + "/w.bin", sw);
    auto cb     = read_file(dir + "/cb.bin", scb);
    auto bounds = read_file(dir + "/bounds.bin", sb);
    auto perm   = read_file(dir + "/perm.bin", sp);
    auto x      = read_file(dir + "/x.bin", sx);
    auto ids    = read_file(dir + "/ids.bin", si);
    if (sw != (size_t) rows*(cols/64)*block_size || sx != (size_t) n*cols*sizeof(float) || si != (size_t) n_ids*sizeof(int32_t)) {
        fprintf(stderr, "error: input sizes do not match the arguments\n");
        return 1;
    }

    ggml_metal_kargs_jlcm args = {};
    args.ne00 = cols;
    args.ne01 = rows;
    args.nb01 = (cols/64)*block_size;
    args.nb02 = rows*args.nb01;
    args.n_groups   = n_groups;
    args.has_perm   = has_perm;
    args.nb_cb2     = (size_t) n_groups*(1 << bits);
    args.nb_bounds1 = (size_t) n_groups*sizeof(int32_t);
    args.nb_perm1   = (size_t) rows*sizeof(int32_t);
    args.nb_perm2   = 2*args.nb_perm1;
    args.r2 = 1;
    // an absent companion is bound to the weight, as the host code does
    const char * pcb = cb ? cb.get() : w.get(), * pbounds = bounds ? bounds.get() : w.get(), * pperm = perm ? perm.get() : w.get();

    using get_rows_t = void (*)(ggml_metal_kargs_jlcm &, const char *, const char *, char *, const char *, const char *, const char *, uint3, ushort, ushort3);
    using mul_mv_t   = void (*)(ggml_metal_kargs_jlcm &, const char *, const char *, char *, const char *, const char *, const char *, uint3, ushort, ushort, ushort);
    using mul_mm_t   = void (*)(ggml_metal_kargs_jlcm &, const char *, const char *, char *, const char *, const char *, const char *, float *, uint3, ushort);
    get_rows_t get_rows = bits == 2 ? kernel_get_rows_jlcm2      : bits == 3 ? kernel_get_rows_jlcm3      : kernel_get_rows_jlcm4;
    mul_mv_t   mul_mv   = bits == 2 ? kernel_mul_mv_jlcm2_f32    : bits == 3 ? kernel_mul_mv_jlcm3_f32    : kernel_mul_mv_jlcm4_f32;
    mul_mm_t   mul_mm   = bits == 2 ? kernel_mul_mm_jlcm2_f32    : bits == 3 ? kernel_mul_mm_jlcm3_f32    : kernel_mul_mm_jlcm4_f32;

    // GET_ROWS of ids: src1 is i32 [N_IDS], dst f32 [COLS, N_IDS]; 64 threads per row (the host takes up
    // to the pipeline's maximum; fewer threads exercise the stride loop)
    {
        ggml_metal_kargs_jlcm a = args;
        a.ne11 = 1;
        a.nb10 = sizeof(int32_t); a.nb11 = n_ids*sizeof(int32_t); a.nb12 = a.nb11;
        a.nb1 = cols*sizeof(float); a.nb2 = n_ids*a.nb1; a.nb3 = a.nb2;
        std::unique_ptr<float[]> out(new float[(size_t) n_ids*cols]());
        metal_emu::dispatch({ (uint) n_ids, 1, 1 }, { 64, 1, 1 }, [&](const metal_emu::thread_pos & p) {
            get_rows(a, w.get(), ids.get(), (char *) out.get(), pcb, pbounds, pperm, p.tgpig, p.tiitg, p.ntg);
        });
        write_file(dir + "/get_rows.f32", out.get(), (size_t) n_ids*cols);
    }

    // MUL_MAT: src1 f32 [COLS, N], dst f32 [ROWS, N]
    ggml_metal_kargs_jlcm a = args;
    a.ne11 = n;
    a.nb10 = sizeof(float); a.nb11 = cols*sizeof(float); a.nb12 = n*a.nb11;
    a.nb1 = rows*sizeof(float); a.nb2 = n*a.nb1; a.nb3 = a.nb2;
    {
        const int nsg = 4;
        std::unique_ptr<float[]> out(new float[(size_t) n*rows]()); // rows dropped by a bad permutation stay 0
        metal_emu::dispatch({ (uint) (rows + nsg - 1)/nsg, (uint) n, 1 }, { 32, nsg, 1 }, [&](const metal_emu::thread_pos & p) {
            mul_mv(a, w.get(), x.get(), (char *) out.get(), pcb, pbounds, pperm, p.tgpig, p.tiisg, p.sgitg, p.nsg);
        });
        write_file(dir + "/mul_mv.f32", out.get(), (size_t) n*rows);
    }
    {
        std::unique_ptr<float[]> out(new float[(size_t) n*rows]()); // rows dropped by a bad permutation stay 0
        std::unique_ptr<float[]> shmem(new float[(32 + 16)*64]);
        metal_emu::dispatch({ (uint) (rows + 31)/32, (uint) (n + 15)/16, 1 }, { 64, 1, 1 }, [&](const metal_emu::thread_pos & p) {
            mul_mm(a, w.get(), x.get(), (char *) out.get(), pcb, pbounds, pperm, shmem.get(), p.tgpig, p.tiitg);
        });
        write_file(dir + "/mul_mm.f32", out.get(), (size_t) n*rows);
    }
    return 0;
}
