/* Makes Intel MKL take its Intel code paths on any x86 CPU.

   MKL picks its kernels by vendor: on a CPU whose vendor string is not
   "GenuineIntel" it skips its AVX-512 and AVX2 kernels whatever the CPU
   supports. It asks `mkl_serv_intel_cpu_true`; PyTorch's wheels link MKL
   statically but export that symbol, so a library preloaded with LD_PRELOAD
   that defines it answers first. Used only by bench.py's opt-in PyTorch
   runs (mkl_unlock.py); never by the project. */

int mkl_serv_intel_cpu_true(void) { return 1; }
