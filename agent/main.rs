//! The `edgeship` command: parses arguments, dispatches, and turns errors into exit codes.
//! Everything it does lives in the library; anyhow stops here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeship::config::Config;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "edgeship",
    version,
    about = "Durable MQTT-to-AWS ingestion agent for edge gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        #[arg(long, short, default_value = "/etc/edgeship/edgeship.toml")]
        config: PathBuf,
    },
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Decode edgeship frames (Kinesis record data, raw or base64; a file or stdin) into JSON lines.
    Decode {
        /// Files to read; none or "-" reads stdin. Base64 input may hold one record per line.
        files: Vec<PathBuf>,
    },
    /// Show the agent's status: from the running agent's admin endpoint, or from the spool
    /// file when the agent is stopped.
    Status {
        #[arg(long, short, default_value = "/etc/edgeship/edgeship.toml")]
        config: PathBuf,
        /// Read this spool file (no config needed) instead of asking the agent.
        #[arg(long)]
        spool: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a self-contained demo: embedded broker, simulated devices, the real pipeline into a
    /// local folder. Needs no cloud account and no installed broker.
    Demo(edgeship::demo::DemoArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; exit 0 if it is valid.
    Validate { file: PathBuf },
    /// Print the commented default config.
    Default,
}

/// glibc raises its mmap threshold each time a large block is freed, after which frame- and
/// call-sized buffers come from the heap and stay in the process; per-thread arenas multiply
/// that. A fixed threshold and two arenas hand them back (measured: peak RSS ~40 -> ~34 MiB
/// in the load program). Called before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgeship: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            edgeship::logging::init("info,aws_config=error");
            let config = Config::load(&config)?;
            runtime()?.block_on(async {
                edgeship::pipeline::run(config, shutdown_signal(), |_| {}).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Config {
            command: ConfigCommand::Validate { file },
        } => match Config::load(&file)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                // The files it names too: a key others can read fails here, not at start.
                edgeship::tls::check_files(&c)
                    .map(|()| c)
                    .map_err(|e| format!("{}: {e}", file.display()))
            }) {
            Ok(c) => {
                println!(
                    "{}: valid ({} broker(s), {} route(s), {} destination(s))",
                    file.display(),
                    c.brokers.len(),
                    c.routes.len(),
                    c.destinations.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", edgeship::config::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
        Command::Decode { files } => decode(files),
        Command::Status {
            config,
            spool,
            json,
        } => {
            let doc = status_doc(&config, spool)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", edgeship::status::render(&doc));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            edgeship::logging::init("warn,edgeship=info,rumqttd=off");
            runtime()?.block_on(edgeship::demo::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the running agent; when it does not answer, reads the spool file.
fn status_doc(
    config: &std::path::Path,
    spool: Option<PathBuf>,
) -> anyhow::Result<edgeship::status::StatusDoc> {
    use edgeship::status::{fetch, StatusDoc};
    let path = match spool {
        Some(p) => p,
        None => {
            let config = Config::load(config)?;
            if let Some(mut addr) = config.admin.listen {
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                match fetch(addr, std::time::Duration::from_secs(3)) {
                    Ok(doc) => return Ok(doc),
                    Err(e) => eprintln!(
                        "edgeship: no answer from the agent at http://{addr}/status ({e}); reading the spool file"
                    ),
                }
            }
            config.spool.path
        }
    };
    let acc = edgeship::spool::store::read_accounting_at(&path)?;
    Ok(StatusDoc::from_spool(&path, acc))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn decode(files: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let inputs: Vec<(String, Vec<u8>)> =
        if files.is_empty() || files.iter().all(|f| f.as_os_str() == "-") {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            vec![("stdin".into(), buf)]
        } else {
            files
                .iter()
                .map(|f| {
                    Ok((
                        f.display().to_string(),
                        std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?
        };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failures = 0;
    for (name, data) in inputs {
        for (i, record) in edgeship::decode::split_input(&data).into_iter().enumerate() {
            match record
                .and_then(|bytes| edgeship::frame::decode_frame(&bytes).map_err(|e| e.to_string()))
            {
                Ok(frame) => {
                    for line in edgeship::decode::json_lines(&frame) {
                        writeln!(out, "{line}")?;
                    }
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("edgeship decode: {name}: record {}: {e}", i + 1);
                }
            }
        }
    }
    out.flush()?;
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
