fn main() -> std::process::ExitCode {
    kappa_cloud::cli::main()
}
