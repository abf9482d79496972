//! Where the Redis store connects: one server, a Redis Cluster, or the master that
//! Sentinel names (followed across a failover).
//!
//! | `--store`                                         | connection                         |
//! |---------------------------------------------------|------------------------------------|
//! | `redis://[USER:PW@]HOST:PORT[/DB]`, `rediss://…`  | one server (multiplexed, reconnecting) |
//! | `redis+cluster://[USER:PW@]H:P[,H:P…]`, `rediss+cluster://…` | the cluster client (slot map, MOVED/ASK, topology refresh) |
//! | `redis+sentinel://[USER:PW@]S:P[,S:P…]/MASTER[/DB]`, `rediss+sentinel://…` | the master Sentinel names; re-resolved after a connection error or `READONLY` |
//!
//! Credentials missing from the URL come from `FAL_STORE_USERNAME` / `FAL_STORE_PASSWORD`
//! (what a Kubernetes Secret fills); they never appear in logs or errors. `rediss`
//! verifies the server against the system's CA store.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

/// Environment variables with the store credentials (used when the URL has none).
pub const ENV_USERNAME: &str = "FAL_STORE_USERNAME";
pub const ENV_PASSWORD: &str = "FAL_STORE_PASSWORD";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one answer on any kind of connection. Above the longest `WAIT` a
/// write may send (`--store-replicas-timeout`, at most [`MAX_WAIT`]).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound of `--store-replicas-timeout`: a `WAIT` stays under [`RESPONSE_TIMEOUT`].
pub const MAX_WAIT: Duration = Duration::from_millis(2500);

/// A parsed `--store` URL (made once per process: the size of the variants is moot).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Target {
    Single(Client),
    Cluster {
        client: redis::cluster::ClusterClient,
        seeds: Vec<ConnectionInfo>,
    },
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        node: SentinelNodeConnectionInfo,
    },
}

/// Credentials from the URL, else from the environment.
fn credentials(user: &str, password: Option<&str>) -> (Option<String>, Option<String>) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = (!user.is_empty())
        .then(|| decode(user))
        .or_else(|| std::env::var(ENV_USERNAME).ok().filter(|v| !v.is_empty()));
    let password = password
        .filter(|p| !p.is_empty())
        .map(decode)
        .or_else(|| std::env::var(ENV_PASSWORD).ok().filter(|v| !v.is_empty()));
    (user, password)
}

fn with_credentials(
    mut info: ConnectionInfo,
    user: &Option<String>,
    password: &Option<String>,
) -> ConnectionInfo {
    let mut settings = info.redis_settings().clone();
    if let Some(u) = user {
        settings = settings.set_username(u);
    }
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    info = info.set_redis_settings(settings);
    info
}

/// `USER:PW@` and the rest of an authority-and-path string.
fn split_userinfo(rest: &str) -> (&str, Option<&str>, &str) {
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p), hosts),
            None => (userinfo, None, hosts),
        },
        None => ("", None, rest),
    }
}

fn node(scheme: &str, hostport: &str) -> Result<ConnectionInfo, String> {
    if hostport.is_empty() {
        return Err("an empty host in the node list".into());
    }
    format!("{scheme}://{hostport}")
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("bad node {hostport:?}: {e}"))
}

impl Target {
    /// Parses a store URL (see the module docs). Errors never contain the password.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{} is not a URL", redact(url)))?;
        match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => {
                let client = Client::open(url).map_err(|e| format!("{}: {e}", redact(url)))?;
                let info = client.get_connection_info().clone();
                let (user, password) = credentials(
                    info.redis_settings().username().unwrap_or(""),
                    info.redis_settings().password(),
                );
                let info = with_credentials(info, &user, &password);
                Ok(Target::Single(
                    Client::open(info).map_err(|e| format!("{}: {e}", redact(url)))?,
                ))
            }
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = scheme.trim_end_matches("+cluster");
                let (user, password, hosts) = split_userinfo(rest);
                let (user, password) = credentials(user, password);
                let hosts = hosts.trim_end_matches('/');
                if hosts.contains('/') {
                    return Err(format!(
                        "{}: a cluster has no database number; use {scheme}://HOST:PORT[,HOST:PORT…]",
                        redact(url)
                    ));
                }
                let seeds = hosts
                    .split(',')
                    .map(|h| node(node_scheme, h.trim()))
                    .map(|r| r.map(|i| with_credentials(i, &user, &password)))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(3)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .build()
                    .map_err(|e| format!("{}: {e}", redact(url)))?;
                Ok(Target::Cluster { client, seeds })
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let tls = scheme == "rediss+sentinel";
                let (user, password, rest) = split_userinfo(rest);
                let (user, password) = credentials(user, password);
                let (hosts, path) = rest.split_once('/').ok_or_else(|| {
                    format!(
                        "{}: name the master: {scheme}://S1:PORT[,S2:PORT…]/MASTER_NAME[/DB]",
                        redact(url)
                    )
                })?;
                let mut parts = path.trim_end_matches('/').split('/');
                let master = parts.next().unwrap_or("").to_string();
                if master.is_empty() {
                    return Err(format!(
                        "{}: name the master: {scheme}://S1:PORT[,S2:PORT…]/MASTER_NAME[/DB]",
                        redact(url)
                    ));
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(d) => d.parse::<i64>().map_err(|_| {
                        format!("{}: the database must be a number, got {d:?}", redact(url))
                    })?,
                };
                // Sentinels themselves are reached without the data nodes' credentials.
                let sentinels = hosts
                    .split(',')
                    .map(|h| node("redis", h.trim()))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut settings = redis::RedisConnectionInfo::default().set_db(db);
                if let Some(u) = &user {
                    settings = settings.set_username(u);
                }
                if let Some(p) = &password {
                    settings = settings.set_password(p);
                }
                let mut node =
                    SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
                if tls {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                Ok(Target::Sentinel {
                    sentinels,
                    master,
                    node,
                })
            }
            _ => Err(format!(
                "{} is not a Redis URL: use redis://HOST:PORT/DB, redis+cluster://H:P[,H:P…] or \
                 redis+sentinel://S:P[,S:P…]/MASTER[/DB] (rediss… for TLS)",
                redact(url)
            )),
        }
    }

    /// The servers, for messages (no credentials).
    pub fn describe(&self) -> String {
        let addrs = |infos: &[ConnectionInfo]| {
            infos
                .iter()
                .map(|i| i.addr().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Target::Single(c) => c.get_connection_info().addr().to_string(),
            Target::Cluster { seeds, .. } => format!("cluster {}", addrs(seeds)),
            Target::Sentinel {
                sentinels, master, ..
            } => format!("master {master:?} via sentinels {}", addrs(sentinels)),
        }
    }

    fn sentinel_client(&self) -> Option<redis::RedisResult<SentinelClient>> {
        match self {
            Target::Sentinel {
                sentinels,
                master,
                node,
            } => Some(SentinelClient::build(
                sentinels.clone(),
                master.clone(),
                Some(node.clone()),
                SentinelServerType::Master,
            )),
            _ => None,
        }
    }

    /// The command connection (lazy: does not fail while Redis is down).
    pub fn connect(&self) -> Result<Conn, String> {
        match self {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .map_err(|e| e.to_string())?;
                Ok(Conn::Single(Arc::new(Single {
                    client: client.clone(),
                    config,
                    manager: std::sync::Mutex::new(manager),
                })))
            }
            Target::Cluster { client, .. } => Ok(Conn::Cluster(Arc::new(Lazy {
                client: LazyClient::Cluster(client.clone()),
                conn: Default::default(),
            }))),
            Target::Sentinel { .. } => {
                let client = self
                    .sentinel_client()
                    .expect("sentinel target")
                    .map_err(|e| e.to_string())?;
                Ok(Conn::Sentinel(Arc::new(Lazy {
                    client: LazyClient::Sentinel(tokio::sync::Mutex::new(client)),
                    conn: Default::default(),
                })))
            }
        }
    }

    /// A pub/sub connection. `attempt` rotates through a cluster's nodes (classic
    /// pub/sub is broadcast to every node of a cluster, so any live node hears every
    /// function); Sentinel is asked for the current master each time.
    pub async fn pubsub(&self, attempt: usize) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            Target::Single(client) => client.get_async_pubsub().await,
            Target::Cluster { seeds, .. } => {
                let seed = seeds[attempt % seeds.len()].clone();
                Client::open(seed)?.get_async_pubsub().await
            }
            Target::Sentinel { .. } => {
                let mut sc = self.sentinel_client().expect("sentinel target")?;
                sc.async_get_client().await?.get_async_pubsub().await
            }
        }
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                format!("{scheme}://{user}:***@{hosts}")
            }
            None => url.to_string(),
        },
        None => "<not a URL>".into(),
    }
}

enum LazyClient {
    Cluster(redis::cluster::ClusterClient),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A connection made on first use and made again after it failed in a way that says
/// the server is gone or no longer the master.
pub struct Lazy<C> {
    client: LazyClient,
    conn: tokio::sync::Mutex<Option<C>>,
}

impl Lazy<ClusterConnection> {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let LazyClient::Cluster(client) = &self.client else {
            unreachable!("cluster client")
        };
        let c = client.get_async_connection().await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl Lazy<MultiplexedConnection> {
    async fn get(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let LazyClient::Sentinel(client) = &self.client else {
            unreachable!("sentinel client")
        };
        // The same bounds as the other kinds: the redis crate's own default response
        // timeout (500 ms) is shorter than a `WAIT` may take (--store-replicas-timeout),
        // and a write whose answer timed out has been applied all the same.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let c = client
            .lock()
            .await
            .get_async_connection_with_config(&config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// After a failover the old master is gone (connection errors) or a replica
    /// (`READONLY`): ask Sentinel again on the next call.
    async fn check<T>(&self, r: &redis::RedisResult<T>) {
        if let Err(e) = r {
            let gone = e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.code() == Some("READONLY")
                || e.code() == Some("MASTERDOWN");
            if gone {
                self.conn.lock().await.take();
            }
        }
    }
}

/// One server's reconnecting connection. The manager reconnects by itself after I/O
/// errors, but not after a timeout: a link that died without a reset (a partition, a
/// vanished peer) would time out forever. A timeout replaces the manager.
pub struct Single {
    client: Client,
    config: ConnectionManagerConfig,
    manager: std::sync::Mutex<ConnectionManager>,
}

impl Single {
    fn current(&self) -> ConnectionManager {
        self.manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check<T>(&self, r: &redis::RedisResult<T>) {
        if matches!(r, Err(e) if e.is_timeout()) {
            if let Ok(fresh) =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            {
                tracing::warn!("redis did not answer in time; replacing the connection");
                *self.manager.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
        }
    }
}

/// The command connection of a hub: cheap to clone, shared by every task.
#[derive(Clone)]
pub enum Conn {
    Single(Arc<Single>),
    Cluster(Arc<Lazy<ClusterConnection>>),
    Sentinel(Arc<Lazy<MultiplexedConnection>>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(s) => Box::pin(async move {
                let r = s.current().req_packed_command(cmd).await;
                s.check(&r);
                r
            }),
            Conn::Cluster(l) => Box::pin(async move {
                let mut c = l.get().await?;
                c.req_packed_command(cmd).await
            }),
            Conn::Sentinel(l) => Box::pin(async move {
                let mut c = l.get().await?;
                let r = c.req_packed_command(cmd).await;
                l.check(&r).await;
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(s) => Box::pin(async move {
                let r = s
                    .current()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                s.check(&r);
                r
            }),
            Conn::Cluster(l) => Box::pin(async move {
                let mut c = l.get().await?;
                c.req_packed_commands(pipeline, offset, count).await
            }),
            Conn::Sentinel(l) => Box::pin(async move {
                let mut c = l.get().await?;
                let r = c.req_packed_commands(pipeline, offset, count).await;
                l.check(&r).await;
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(s) => s.current().get_db(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_never_shows_the_password() {
        let t = Target::parse("redis://:s3cret@127.0.0.1:6379/2").unwrap();
        assert!(!t.describe().contains("s3cret"));
        let Target::Single(c) = &t else { panic!() };
        assert_eq!(
            c.get_connection_info().redis_settings().password(),
            Some("s3cret")
        );
        assert_eq!(c.get_connection_info().redis_settings().db(), 2);

        let t = Target::parse("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/").unwrap();
        let Target::Cluster { seeds, .. } = &t else {
            panic!()
        };
        assert_eq!(seeds.len(), 2);
        assert_eq!(seeds[1].redis_settings().password(), Some("p@ss"));
        assert_eq!(seeds[1].redis_settings().username(), Some("u"));
        assert_eq!(t.describe(), "cluster 10.0.0.1:7000,10.0.0.2:7001");

        let t = Target::parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3").unwrap();
        let Target::Sentinel {
            sentinels, master, ..
        } = &t
        else {
            panic!()
        };
        assert_eq!((sentinels.len(), master.as_str()), (2, "mymaster"));
        assert!(!t.describe().contains("pw"));

        for (bad, says) in [
            ("redis+sentinel://s1:26379", "name the master"),
            ("redis+sentinel://s1:26379//", "name the master"),
            ("redis+sentinel://s1:26379/m/x", "number"),
            ("redis+cluster://a:1/0", "no database"),
            ("redis+cluster://a:1,,b:2", "empty host"),
            ("memcached://a:1", "not a Redis URL"),
        ] {
            let e = Target::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = Target::parse("mongodb://user:hunter2@x").err().unwrap();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn redacts() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
    }
}
