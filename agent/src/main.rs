//! The `tollgate` binary: parse arguments, run, map the outcome to an exit code.

fn main() {
    std::process::exit(tollgate::cli::main());
}
