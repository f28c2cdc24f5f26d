//! One connection type over the three Redis deployments the store accepts:
//! one server, a Sentinel-watched master, a Redis Cluster.
//!
//! [`RedisConn`] is a `redis::aio::ConnectionLike`, so the store sends its
//! scripts and commands the same way in each mode; [`RedisConn::pubsub`]
//! opens a subscription on a node that receives every revocation.
//!
//! - One server: the crate's `ConnectionManager` (reconnects by itself).
//! - Sentinel: the crate asks the Sentinels for the master and checks its
//!   `ROLE`; it does not follow a failover by itself, so this keeps one
//!   multiplexed connection to the master found and drops it on any
//!   connection error, timeout, `READONLY` or `MASTERDOWN` answer: the next
//!   command asks the Sentinels again and so lands on the new master.
//! - Cluster: the crate's cluster connection, which follows `MOVED`/`ASK`
//!   and refreshes the slot map after a failover. It is created at the first
//!   command, so the service starts (not ready) while the cluster is away.
//!
//! Revocations are sent with plain `PUBLISH`, which Redis Cluster forwards
//! to every node over its bus; a subscriber on any node, master or replica,
//! hears all of them, and moves to another node when its node goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisFuture, RedisResult,
    TlsCertificates, TlsMode, Value,
};
use tokio::sync::Mutex;

use super::url::{Auth, Node, RedisTarget};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Below the store's own 2 s bound, so that a master that stopped
/// answering is noticed here (and looked up again) before the caller gives up.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1500);

/// What `rediss` connections trust and present: the certificate
/// authorities (PEM; instead of the system's bundle when given) and a client
/// certificate with its key (PEM), for servers that ask for one.
#[derive(Clone, Default)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        self.is_set().then(|| TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: self.ca.clone(),
        })
    }
}

/// Never shows the key.
impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// A client for one node, with `tls`'s certificates when it has any.
fn client_for(info: impl IntoConnectionInfo, tls: &RedisTls) -> RedisResult<redis::Client> {
    match tls.certificates() {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
}

#[derive(Clone)]
pub enum RedisConn {
    Single(Box<SingleConn>),
    Sentinel(Arc<SentinelConn>),
    Cluster(Arc<ClusterConn>),
}

#[derive(Clone)]
pub struct SingleConn {
    conn: ConnectionManager,
    client: redis::Client,
}

fn async_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

fn addr(node: &Node, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    }
}

fn settings(auth: &Auth, db: i64) -> RedisConnectionInfo {
    let mut s = RedisConnectionInfo::default().set_db(db);
    if let Some(u) = &auth.username {
        s = s.set_username(u);
    }
    if let Some(p) = &auth.password {
        s = s.set_password(p);
    }
    s
}

fn node_info(node: &Node, tls: bool, auth: &Auth, db: i64) -> RedisResult<ConnectionInfo> {
    Ok(addr(node, tls)
        .into_connection_info()?
        .set_redis_settings(settings(auth, db)))
}

impl RedisConn {
    /// A Redis Cluster: a script's keys must all live on one shard.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Builds the connection without dialling anything yet. `tls` applies
    /// to `rediss` targets (the caller refuses it for the others).
    pub fn new(target: &RedisTarget, tls: &RedisTls) -> RedisResult<RedisConn> {
        match target {
            RedisTarget::Single { url } => {
                let client = client_for(url.as_str(), tls)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
                Ok(RedisConn::Single(Box::new(SingleConn { conn, client })))
            }
            RedisTarget::Sentinel {
                sentinels,
                master,
                auth,
                sentinel_password,
                db,
                tls: secure,
            } => {
                let addrs = sentinels.iter().map(|n| addr(n, *secure));
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
                        .set_client_to_redis_db(*db);
                if let Some(u) = &auth.username {
                    builder = builder.set_client_to_redis_username(u);
                }
                if let Some(p) = &auth.password {
                    builder = builder.set_client_to_redis_password(p);
                }
                if let Some(p) = sentinel_password {
                    builder = builder.set_client_to_sentinel_password(p);
                }
                if *secure {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    if let Some(certs) = tls.certificates() {
                        builder = builder
                            .set_client_to_redis_certificates(certs.clone())
                            .set_client_to_sentinel_certificates(certs);
                    }
                }
                Ok(RedisConn::Sentinel(Arc::new(SentinelConn {
                    sentinel: Mutex::new(builder.build()?),
                    master: master.clone(),
                    db: *db,
                    current: Mutex::new(None),
                })))
            }
            RedisTarget::Cluster {
                nodes,
                auth,
                tls: secure,
            } => {
                let seeds = nodes
                    .iter()
                    .map(|n| node_info(n, *secure, auth, 0))
                    .collect::<RedisResult<Vec<_>>>()?;
                let mut builder = ClusterClient::builder(seeds.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(3)
                    .min_retry_wait(50)
                    .max_retry_wait(400);
                if let Some(u) = &auth.username {
                    builder = builder.username(u);
                }
                if let Some(p) = &auth.password {
                    builder = builder.password(p);
                }
                if *secure {
                    builder = builder.tls(TlsMode::Secure);
                    if let Some(certs) = tls.certificates() {
                        builder = builder.certs(certs);
                    }
                }
                Ok(RedisConn::Cluster(Arc::new(ClusterConn {
                    client: builder.build()?,
                    conn: Mutex::new(None),
                    known: std::sync::Mutex::new(seeds),
                    auth: auth.clone(),
                    secure: *secure,
                    tls: tls.clone(),
                    next: AtomicUsize::new(0),
                })))
            }
        }
    }

    /// A fresh pub/sub connection on a node that hears every revocation:
    /// the server, the current master, or any reachable cluster node.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            RedisConn::Single(s) => s.client.get_async_pubsub().await,
            RedisConn::Sentinel(s) => s.master_client().await?.get_async_pubsub().await,
            RedisConn::Cluster(c) => c.pubsub().await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(s) => s.conn.req_packed_command(cmd),
            RedisConn::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.connection().await?;
                let answer = conn.req_packed_command(cmd).await;
                // A server error (a script's write refused by a demoted
                // master) comes back as a value, not as an error.
                let lost = match &answer {
                    Err(e) => Some(e.clone()),
                    Ok(Value::ServerError(se)) => Some(RedisError::from(se.clone())),
                    Ok(_) => None,
                };
                s.check(generation, lost.as_ref()).await;
                answer
            }),
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection().await?;
                conn.req_packed_command(cmd).await
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
            RedisConn::Single(s) => s.conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.connection().await?;
                let answer = conn.req_packed_commands(pipeline, offset, count).await;
                let lost = match &answer {
                    Err(e) => Some(e.clone()),
                    // A pipeline reports a server error inside its values.
                    Ok(values) => values.iter().find_map(|v| match v {
                        Value::ServerError(se) => Some(RedisError::from(se.clone())),
                        _ => None,
                    }),
                };
                s.check(generation, lost.as_ref()).await;
                answer
            }),
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(s) => s.conn.get_db(),
            RedisConn::Sentinel(s) => s.db,
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// Whether an error means the connection no longer leads to a writable
/// master, so that the next command should look for the master again.
pub fn lost_master(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        return true;
    }
    if matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) {
        return true;
    }
    // A script's write refused by a replica comes back wrapped; NOREPLICAS:
    // a master cut off from its replicas (`min-replicas-to-write`), which
    // the Sentinels are replacing.
    let text = e.to_string();
    text.contains("READONLY") || text.contains("MASTERDOWN") || text.contains("NOREPLICAS")
}

pub struct SentinelConn {
    sentinel: Mutex<SentinelClient>,
    master: String,
    db: i64,
    /// The connection to the master last found, with a generation number so
    /// that a late error on an old connection does not drop a newer one.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
}

impl SentinelConn {
    async fn master_client(&self) -> RedisResult<redis::Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        // Held while connecting: one lookup at a time, the others wait for it.
        let mut current = self.current.lock().await;
        if let Some((generation, conn)) = current.as_ref() {
            return Ok((*generation, conn.clone()));
        }
        let client = self.master_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&async_config())
            .await?;
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        tracing::info!(master = %self.master, "connected to the Redis master named by Sentinel");
        *current = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    async fn check(&self, generation: u64, err: Option<&RedisError>) {
        if let Some(e) = err
            && lost_master(e)
        {
            let mut current = self.current.lock().await;
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "Redis master lost; asking Sentinel again");
                *current = None;
            }
        }
    }
}

pub struct ClusterConn {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
    /// Seeds and every node seen since, for the subscriber.
    known: std::sync::Mutex<Vec<ConnectionInfo>>,
    auth: Auth,
    secure: bool,
    tls: RedisTls,
    next: AtomicUsize,
}

impl ClusterConn {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.client.get_async_connection().await?;
        tracing::info!("connected to the Redis Cluster");
        *slot = Some(c.clone());
        Ok(c)
    }

    fn known(&self) -> Vec<ConnectionInfo> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Learns the cluster's nodes from one of them (`CLUSTER NODES`).
    fn learn(&self, nodes_answer: &str) {
        let mut found = Vec::new();
        for line in nodes_answer.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_id), Some(address), Some(flags)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if flags.contains("fail") || flags.contains("noaddr") || flags.contains("handshake") {
                continue;
            }
            // ip:port@cport[,hostname]
            let hostport = address.split(['@', ',']).next().unwrap_or_default();
            let Some((host, port)) = hostport.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            if host.is_empty() || port == 0 {
                continue;
            }
            let node = Node {
                host: host.trim_matches(['[', ']']).to_string(),
                port,
            };
            if let Ok(info) = node_info(&node, self.secure, &self.auth, 0) {
                found.push(info);
            }
        }
        if found.is_empty() {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        for info in found {
            if !known.iter().any(|k| k.addr() == info.addr()) {
                known.push(info);
            }
        }
    }

    /// Subscribes on the next reachable node, round robin.
    async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let known = self.known();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..known.len() {
            let info = known[(start + i) % known.len()].clone();
            let attempt = async {
                let client = client_for(info, &self.tls)?;
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&async_config())
                    .await?;
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?;
                self.learn(&nodes);
                client.get_async_pubsub().await
            };
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "cluster node did not answer in time",
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from(std::io::Error::other("no Redis Cluster node known"))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_are_learnt_without_failed_ones() {
        let target = RedisTarget::parse("redis+cluster://127.0.0.1:7000").unwrap();
        let RedisConn::Cluster(c) = RedisConn::new(&target, &RedisTls::default()).unwrap() else {
            panic!("not a cluster")
        };
        c.learn(
            "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
             b 127.0.0.1:7001@17001,host-b master - 0 0 2 connected 5461-10922\n\
             c 127.0.0.1:7002@17002 master,fail - 0 0 3 connected\n\
             garbage\n\
             d :0@0 master,noaddr - 0 0 0 connected\n",
        );
        let ports: Vec<String> = c.known().iter().map(|i| i.addr().to_string()).collect();
        assert_eq!(ports, ["127.0.0.1:7000", "127.0.0.1:7001"]);
    }

    #[test]
    fn tls_certificates_are_handed_over_only_when_given() {
        assert!(!RedisTls::default().is_set());
        assert!(RedisTls::default().certificates().is_none());
        let ca = RedisTls {
            ca: Some(b"ca".to_vec()),
            client: None,
        };
        let c = ca.certificates().unwrap();
        assert_eq!(c.root_cert.as_deref(), Some(&b"ca"[..]));
        assert!(c.client_tls.is_none());
        let client = RedisTls {
            ca: None,
            client: Some((b"cert".to_vec(), b"secret key".to_vec())),
        };
        assert!(client.is_set());
        let c = client.certificates().unwrap();
        assert!(c.root_cert.is_none());
        let id = c.client_tls.unwrap();
        assert_eq!(
            (&id.client_cert[..], &id.client_key[..]),
            (&b"cert"[..], &b"secret key"[..])
        );
        // What is set, never the key itself.
        let shown = format!("{client:?}");
        assert!(
            shown.contains("ca: false") && shown.contains("client_certificate: true"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn lost_master_errors() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(lost_master(&io));
        let ro = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY You can't write against a read only replica.",
        ));
        assert!(lost_master(&ro));
        let cut_off = RedisError::from((
            redis::ErrorKind::Extension,
            "NOREPLICAS Not enough good replicas to write.",
        ));
        assert!(lost_master(&cut_off));
        let other = RedisError::from((redis::ErrorKind::Client, "wrong type"));
        assert!(!lost_master(&other));
    }
}
