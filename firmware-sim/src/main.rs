fn main() -> std::process::ExitCode {
    kappa_sim::cli::main()
}
