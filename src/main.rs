//! The `alpn-xds` command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use alpn_xds::config::{Cli, Command, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `explain` is a one-shot report: what it finds goes into its output, not into logs.
    if let Command::Explain(args) = &cli.command {
        return alpn_xds::explain::run(args);
    }
    init_logging(cli.log_format);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("alpn-xds: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => alpn_xds::app::serve(args).await,
            Command::Explain(_) => unreachable!("explain returns before the runtime starts"),
        }
    });

    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("alpn-xds: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("ALPN_XDS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
