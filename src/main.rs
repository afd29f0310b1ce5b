fn main() -> anyhow::Result<()> {
    orderflow::cli::main()
}
