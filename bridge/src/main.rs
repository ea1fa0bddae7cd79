//! The `hybridge` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    hybridge::cli::main()
}
