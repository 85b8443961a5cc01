//! `strata login`, `strata whoami`, `strata user add|list|remove` and
//! `strata acl set|list|remove`: the client side of `strata.v1.Auth`.
//!
//! Passwords never go on the command line (they would show in `ps` and shell history):
//! they come from a file, from stdin (`-`), or from an environment variable.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::json;
use strata_proto::v1::auth_client::AuthClient;
use strata_proto::v1::{
    AddUserRequest, ListStreamRulesRequest, ListUsersRequest, LoginRequest, LoginResponse, RemoveStreamRuleRequest, RemoveUserRequest, StreamRule,
    WhoAmIRequest,
};

use crate::cli::{connect, format_unix_ms, ClientOptions, CliError};

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The user to log in as.
    #[arg(long)]
    pub user: String,
    /// A file holding the password, or `-` for stdin. Without it: STRATA_PASSWORD.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Print the token instead of saving it to the token file.
    #[arg(long)]
    pub print: bool,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user (admin only); `--replace` sets a new password and roles for an existing one.
    Add {
        name: String,
        /// admin, ops, writer or reader (repeat, or comma-separated).
        #[arg(long = "role", value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// A file holding the new user's password, or `-` for stdin. Without it:
        /// STRATA_NEW_PASSWORD.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[arg(long)]
        replace: bool,
    },
    /// List users and their roles (admin only).
    List,
    /// Remove a user (admin only): their tokens stop working at once.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Set who may read and write the streams a pattern matches: a stream name, or a
    /// prefix ending in `*`. Entries are user names or `role:<role>`; the most specific
    /// matching rule decides.
    Set {
        pattern: String,
        #[arg(long, value_delimiter = ',')]
        read: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        write: Vec<String>,
    },
    /// List the stream rules.
    List,
    /// Remove a stream rule.
    Remove { pattern: String },
}

/// A password from `file` (`-`: stdin), else from the environment variable `env`.
fn password_from(file: Option<&Path>, env: &str) -> Result<String, CliError> {
    let raw = match file {
        Some(path) if path == Path::new("-") => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input).map_err(|e| CliError::Usage(format!("cannot read the password from stdin: {e}")))?;
            input
        }
        Some(path) => std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?,
        None => std::env::var(env).map_err(|_| CliError::Usage(format!("give the password with --password-file <file|-> or {env}")))?,
    };
    let password = raw.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(CliError::Usage("the password is empty".into()));
    }
    Ok(password)
}

/// Writes the token where only this user can read it.
fn save_token(path: &Path, token: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CliError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(token.as_bytes()).map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))
}

/// Logs `user` in with the password in `password_file` (or STRATA_PASSWORD) and returns
/// the node's answer (the token and when it expires).
pub async fn request_token(options: &ClientOptions, user: &str, password_file: Option<&Path>) -> Result<LoginResponse, CliError> {
    let password = password_from(password_file, "STRATA_PASSWORD")?;
    // Logging in needs no token: a stale one in the file must not get in the way.
    let mut anonymous = options.clone();
    anonymous.auth.token = None;
    anonymous.auth.token_file = Some(PathBuf::from("/dev/null"));
    Ok(AuthClient::new(connect(&anonymous).await?).login(LoginRequest { user: user.to_string(), password }).await?.into_inner())
}

/// Logs in and saves the token to the options' token file; returns that file.
pub async fn login_to_token_file(options: &ClientOptions, user: &str, password_file: Option<&Path>) -> Result<PathBuf, CliError> {
    let reply = request_token(options, user, password_file).await?;
    let path = options.auth.token_path();
    save_token(&path, &reply.token)?;
    Ok(path)
}

pub async fn login(options: &ClientOptions, args: LoginArgs) -> Result<(), CliError> {
    let reply = request_token(options, &args.user, args.password_file.as_deref()).await?;
    let expires = format_unix_ms(reply.expires_unix_secs as i64 * 1000);
    if args.print {
        println!("{}", reply.token);
        return Ok(());
    }
    let path = options.auth.token_path();
    save_token(&path, &reply.token)?;
    if options.json {
        println!("{}", json!({"user": args.user, "roles": reply.roles, "expires_unix_secs": reply.expires_unix_secs, "token_file": path}));
    } else {
        println!("logged in as {} ({}) until {expires}; token saved to {}", args.user, reply.roles.join(","), path.display());
    }
    Ok(())
}

pub async fn whoami(options: &ClientOptions) -> Result<(), CliError> {
    let reply = AuthClient::new(connect(options).await?).who_am_i(WhoAmIRequest {}).await?.into_inner();
    if options.json {
        println!("{}", json!({"user": reply.user, "roles": reply.roles, "via": reply.via}));
    } else {
        println!("{} ({}) via {}", reply.user, reply.roles.join(","), reply.via);
    }
    Ok(())
}

pub async fn user(options: &ClientOptions, command: UserCommand) -> Result<(), CliError> {
    let mut client = AuthClient::new(connect(options).await?);
    match command {
        UserCommand::Add { name, roles, password_file, replace } => {
            let password = password_from(password_file.as_deref(), "STRATA_NEW_PASSWORD")?;
            client.add_user(AddUserRequest { user: name.clone(), password, roles: roles.clone(), replace }).await?;
            if options.json {
                println!("{}", json!({"user": name, "roles": roles, "replaced": replace}));
            } else {
                println!("user {name} {} with roles {}", if replace { "replaced" } else { "added" }, roles.join(","));
            }
        }
        UserCommand::List => {
            let users = client.list_users(ListUsersRequest {}).await?.into_inner().users;
            for user in users {
                if options.json {
                    println!("{}", json!({"user": user.user, "roles": user.roles, "created_unix_ms": user.created_unix_ms}));
                } else {
                    println!("{:<24} {:<24} created {}", user.user, user.roles.join(","), format_unix_ms(user.created_unix_ms));
                }
            }
        }
        UserCommand::Remove { name } => {
            client.remove_user(RemoveUserRequest { user: name.clone() }).await?;
            if options.json {
                println!("{}", json!({"removed": name}));
            } else {
                println!("user {name} removed");
            }
        }
    }
    Ok(())
}

pub async fn acl(options: &ClientOptions, command: AclCommand) -> Result<(), CliError> {
    let mut client = AuthClient::new(connect(options).await?);
    let print_rule = |rule: &StreamRule| {
        if options.json {
            println!("{}", json!({"pattern": rule.pattern, "read": rule.read, "write": rule.write}));
        } else {
            println!("{:<32} read: {:<32} write: {}", rule.pattern, rule.read.join(","), rule.write.join(","));
        }
    };
    match command {
        AclCommand::Set { pattern, read, write } => {
            let rule = StreamRule { pattern, read, write };
            client.set_stream_rule(rule.clone()).await?;
            print_rule(&rule);
        }
        AclCommand::List => {
            for rule in client.list_stream_rules(ListStreamRulesRequest {}).await?.into_inner().rules {
                print_rule(&rule);
            }
        }
        AclCommand::Remove { pattern } => {
            client.remove_stream_rule(RemoveStreamRuleRequest { pattern: pattern.clone() }).await?;
            if options.json {
                println!("{}", json!({"removed": pattern}));
            } else {
                println!("stream rule {pattern} removed");
            }
        }
    }
    Ok(())
}
