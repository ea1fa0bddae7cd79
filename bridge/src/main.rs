//! The `hybridge` binary: parses arguments and hands over to the library.

/// jemalloc rather than glibc malloc: glibc spent ~13% of the bridge's CPU in malloc/free
/// (per-request buffers of hyper and quinn); on the single-threaded runtime jemalloc gave
/// small requests +10% and 1 MiB responses +5% for ~1 MiB more idle RSS (BENCHMARKS.md §1).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    hybridge::cli::main()
}
