"""The harness. Importing it pins MKL's kernel path before the first MKL call of the process (MKL reads
MKL_CBWR then): MKL otherwise picks kernels per CPU (AVX-512 on one Intel, AVX2 on AMD), and results
differ in the last bits between machines, enough to move SparseGPT's perplexity by ~1%. AVX2 is the
newest path every x86 CPU of the last decade runs, and what MKL picks on AMD anyway. A user's own
MKL_CBWR wins; provenance records the value in effect."""
import os

os.environ.setdefault("MKL_CBWR", "AVX2")
