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
    /// The S3 batch path's tools.
    S3 {
        #[command(subcommand)]
        command: S3Command,
    },
    /// Operator actions on the spool file (the agent must be stopped).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Fleet config push, the operator's side: keys, signing, publishing, status.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Run a self-contained demo: embedded broker, simulated devices, the real pipeline into a
    /// local folder. Needs no cloud account and no installed broker.
    #[cfg(feature = "demo")]
    Demo(edgeship::demo::DemoArgs),
    /// Not in this build (a package for gateways): run scripts/demo.sh from the source tree.
    #[cfg(not(feature = "demo"))]
    #[command(hide = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum S3Command {
    /// Print the Athena CREATE EXTERNAL TABLE (partition projection over dt=/hr=) for a
    /// route's objects, or with --glue the Glue TableInput JSON for `aws glue create-table`.
    Ddl {
        #[arg(long, short, default_value = "/etc/edgeship/edgeship.toml")]
        config: PathBuf,
        #[arg(long)]
        route: String,
        /// The route's S3 destination, if it has several.
        #[arg(long)]
        destination: Option<String>,
        /// The table's name (default: the route's).
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        glue: bool,
    },
}

/// How the fleet tools reach the broker the gateways' fleet channels use.
#[derive(clap::Args)]
struct BrokerOpts {
    /// HOST or HOST:PORT (port 1883, or 8883 with --ca-file).
    #[arg(long)]
    broker: String,
    #[arg(long)]
    username: Option<String>,
    /// A file holding the password (not the password itself: it would show in `ps`).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Connect over TLS, trusting this CA file.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The topic prefix the gateways use (`[fleet] topic_prefix`).
    #[arg(long, default_value = "edgeship")]
    prefix: String,
}

impl BrokerOpts {
    fn broker(&self) -> anyhow::Result<edgeship::fleet::tools::BrokerArgs> {
        let tls =
            (self.ca_file.is_some() || self.cert.is_some()).then(|| edgeship::tls::TlsConfig {
                ca_file: self.ca_file.clone(),
                client_cert: self.cert.clone(),
                client_key: self.key.clone(),
                alpn: Vec::new(),
            });
        let mut b = edgeship::fleet::tools::BrokerArgs::parse(&self.broker, tls)?;
        b.username = self.username.clone();
        if let Some(f) = &self.password_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the password file {}", f.display()))?;
            b.password = Some(text.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(b)
    }
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Make a signing key: writes OUT (private, mode 0600) and OUT.pub, prints the public key
    /// for the gateways' `[fleet] keys`.
    Keygen {
        #[arg(long, default_value = "fleet.key")]
        out: PathBuf,
    },
    /// Sign a config document (TOML: routes, destinations, batch, spool limits) for a gateway
    /// or a group; checks it first as a gateway would.
    Sign {
        config: PathBuf,
        #[arg(long, default_value = "fleet.key")]
        key: PathBuf,
        /// gateway:<gateway_id> or group:<group>
        #[arg(long)]
        target: edgeship::fleet::document::Target,
        /// Must grow with every document (default: the current Unix time in seconds).
        #[arg(long)]
        version: Option<u64>,
        /// A gateway's local config file to check the document against.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Gateways refuse the document after this long (e.g. "7d"), so a copy replayed
        /// later does nothing.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Where to write the signed document (default: stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Publish a signed document (retained) on its target's config topic.
    Push {
        /// The signed document; leave out with --clear.
        document: Option<PathBuf>,
        /// The target it must be signed for (a check; the document names its target).
        #[arg(long)]
        target: Option<edgeship::fleet::document::Target>,
        /// Remove the target's retained document instead (gateways fall back to their groups').
        #[arg(long, requires = "target", conflicts_with = "document")]
        clear: bool,
        #[command(flatten)]
        broker: BrokerOpts,
    },
    /// Collect the status documents of the gateways that answered.
    Status {
        #[command(flatten)]
        broker: BrokerOpts,
        /// How long to collect after subscribing.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        wait: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, edgeship::config::units::UnitError> {
    edgeship::config::units::HumanDuration::parse(text).map(|d| d.0)
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Remove the records of a route no destination ships any more (its route and destination
    /// were removed from the config); they are counted as dropped (`removed`).
    DropRoute {
        route: String,
        #[arg(long, short, default_value = "/etc/edgeship/edgeship.toml")]
        config: PathBuf,
        /// This spool file instead of the config's.
        #[arg(long)]
        spool: Option<PathBuf>,
    },
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

/// The runtime's worker threads. One: the agent's heavy work has threads of its own (the
/// spool thread, blocking threads for compression), so the runtime mostly waits on sockets
/// and timers, and with two workers each wakeup could wake both (one to look for work to
/// steal). Measured with the shapes program (MQTT 3.1.1, device key, 100 devices, Kinesis
/// emulator, same build, two runs each): 1,000 msg/s 11.0-12.1 -> 10.0-10.2 us per message,
/// saturating 4.3-4.5 -> 4.1-4.3 at the same rate (about 53,000 msg/s). The future given to
/// `block_on` (the app's supervision) runs on the calling thread besides.
const WORKER_THREADS: usize = 1;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            edgeship::logging::init("info,aws_config=error,rskafka=warn");
            let base = edgeship::fleet::Base::load(&config)?;
            runtime()?.block_on(edgeship::app::run(base, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet { command } => fleet(command),
        Command::Spool {
            command:
                SpoolCommand::DropRoute {
                    route,
                    config,
                    spool,
                },
        } => {
            let path = match spool {
                Some(p) => p,
                None => {
                    let config = Config::load(&config)?;
                    if let Some(mut addr) = config.admin.listen {
                        if addr.ip().is_unspecified() {
                            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                        }
                        if std::net::TcpStream::connect_timeout(
                            &addr,
                            std::time::Duration::from_secs(1),
                        )
                        .is_ok()
                        {
                            anyhow::bail!("the agent is running (its admin endpoint answers at {addr}); stop it first (systemctl stop edgeship)");
                        }
                    }
                    config.spool.path
                }
            };
            let (mut store, _) =
                edgeship::spool::store::Store::open(&path, edgeship::config::SyncLevel::Full)?;
            let records = store.drop_route(&route)?;
            println!(
                "removed {records} records of route {route} from {} (counted as dropped: removed)",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Validate { file },
        } => match Config::load(&file)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                // The files it names too: a key others can read fails here, not at start.
                c.check_files()
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
        Command::S3 {
            command:
                S3Command::Ddl {
                    config,
                    route,
                    destination,
                    table,
                    glue,
                },
        } => {
            let config = Config::load(&config)?;
            let text = edgeship::config::athena_ddl(
                &config,
                &route,
                destination.as_deref(),
                table.as_deref(),
                glue,
            )
            .map_err(anyhow::Error::msg)?;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
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
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => {
            eprintln!("edgeship: this build has no demo (packages for gateways leave out its embedded broker); run scripts/demo.sh in the source tree");
            Ok(ExitCode::from(2))
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            edgeship::logging::init("warn,edgeship=info,rumqttd=off");
            runtime()?.block_on(edgeship::demo::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fleet(command: FleetCommand) -> anyhow::Result<ExitCode> {
    use edgeship::fleet::tools;
    match command {
        FleetCommand::Keygen { out } => {
            let public = tools::keygen(&out)?;
            eprintln!(
                "wrote {} (private: keep it off the gateways) and {}.pub",
                out.display(),
                out.display()
            );
            eprintln!("pin it in each gateway's config:\n  [fleet]\n  keys = [\"{public}\"]");
            println!("{public}");
        }
        FleetCommand::Sign {
            config,
            key,
            target,
            version,
            base,
            expires_in,
            out,
        } => {
            let (doc, version) = tools::sign(
                &config,
                &key,
                target.clone(),
                version,
                base.as_deref(),
                expires_in,
            )?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &doc)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "signed {} as version {version} for {target}: {}",
                        config.display(),
                        path.display()
                    );
                }
                None => print!("{doc}"),
            }
        }
        FleetCommand::Push {
            document,
            target,
            clear,
            broker,
        } => {
            let args = broker.broker()?;
            runtime()?.block_on(async {
                if clear {
                    let target = target.expect("clap requires --target with --clear");
                    let topic = tools::clear(&target, &args, &broker.prefix).await?;
                    println!("cleared the document of {target} ({topic})");
                } else {
                    let doc = document.context("name the signed document to push (or --clear)")?;
                    let (topic, version) =
                        tools::push(&doc, target.as_ref(), &args, &broker.prefix).await?;
                    println!("published version {version} on {topic} (retained)");
                }
                anyhow::Ok(())
            })?;
        }
        FleetCommand::Status { broker, wait, json } => {
            let args = broker.broker()?;
            let reports =
                runtime()?.block_on(tools::collect_status(&args, &broker.prefix, wait))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!(
                    "{}",
                    tools::render_status(&reports, edgeship::clock::now_secs())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
                let answer = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?
                    .block_on(fetch(addr, std::time::Duration::from_secs(3)));
                match answer {
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
