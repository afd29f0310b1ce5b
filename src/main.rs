/// glibc's allocator took about a quarter of a stage worker's CPU (records are many small
/// allocations freed on another thread than the one that made them); mimalloc's
/// per-thread free lists make that a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    orderflow::cli::main()
}
