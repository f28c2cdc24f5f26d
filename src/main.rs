use std::io::Read as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokenpolicy::service::serve::{ServeArgs, run};

/// A token service that enforces a TokenPolicy, and its Kubernetes operator.
#[derive(Parser)]
#[command(name = "tokenpolicy", version)]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(
        long,
        global = true,
        env = "TOKENPOLICY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the token service.
    Serve(Box<ServeArgs>),
    /// Read a password on stdin, print an argon2id hash for the users file.
    HashPassword,
    /// Print the TokenPolicy CustomResourceDefinition (YAML).
    Crd,
    /// Run the Kubernetes operator.
    Operator(tokenpolicy::operator::OperatorArgs),
    /// List or end anyone's sessions through the admin API.
    Sessions(tokenpolicy::sessions_cli::SessionsArgs),
    /// Print the Deployment the operator writes for a TokenPolicy manifest (JSON).
    #[command(hide = true)]
    RenderDeployment(tokenpolicy::operator::render::RenderArgs),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(tokenpolicy::logging::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn hash_password() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("empty password on stdin");
    }
    if password.len() > tokenpolicy::service::users::MAX_PASSWORD_LEN {
        anyhow::bail!(
            "password longer than {} bytes",
            tokenpolicy::service::users::MAX_PASSWORD_LEN
        );
    }
    println!(
        "{}",
        tokenpolicy::service::users::hash_password(password).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A command-line client: it says what went wrong itself, without the
    // HTTP client's log lines.
    if !matches!(cli.command, Command::Sessions(_)) {
        init_logging(&cli.log_format);
    }
    let result = match cli.command {
        Command::Sessions(args) => {
            return match runtime() {
                Ok(rt) => rt.block_on(tokenpolicy::sessions_cli::run(args)),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(run(*args))),
        Command::Operator(args) => {
            runtime().and_then(|rt| rt.block_on(tokenpolicy::operator::run(args)))
        }
        Command::HashPassword => hash_password(),
        Command::RenderDeployment(args) => {
            tokenpolicy::operator::render::render(&args).map(|json| println!("{json}"))
        }
        Command::Crd => {
            print!("{}", tokenpolicy::crd::crd_yaml());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
