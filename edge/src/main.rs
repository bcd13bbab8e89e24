fn main() -> std::process::ExitCode {
    kappa_edge::cli::main()
}
