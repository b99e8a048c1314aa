use clap::Parser;

fn main() {
    let cli = kiln::Cli::parse();
    let default = match cli.verbose {
        0 => "kiln=warn",
        1 => "kiln=info",
        _ => "kiln=debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = kiln::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(kiln::exit_code(&e));
    }
}
