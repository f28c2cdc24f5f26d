//! Where a TokenPolicy becomes a Deployment: the objects the operator owns,
//! built as plain values (no I/O) so that each can be checked in a test.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::TokenPolicy;
use crate::operator::names::selector;
pub use crate::operator::names::{
    KEYS_ANNOTATION, MANAGER, METRICS_PORT, PORT, PROMOTED_AT_ANNOTATION, ROTATE_ANNOTATION,
    ROTATED_FOR_ANNOTATION, endpoint, labels, object_name, signing_secret_name,
};
use crate::operator::rotation::{self, KeyRing};

const KEYS_DIR: &str = "/etc/tokenpolicy/keys";
const USERS_DIR: &str = "/etc/tokenpolicy/users";
/// The users file's name in `USERS_DIR`, whatever the Secret's key.
const USERS_FILE: &str = "users";
const REDIS_CA_DIR: &str = "/etc/tokenpolicy/redis-ca";
/// The OpenID Connect client secret (`client-secret`) and the provider's
/// CA (`ca.crt`), each only the named key of its Secret.
const OIDC_DIR: &str = "/etc/tokenpolicy/oidc";
const OIDC_CA_DIR: &str = "/etc/tokenpolicy/oidc-ca";
const REDIS_CLIENT_DIR: &str = "/etc/tokenpolicy/redis-client";

/// The keys of a client-certificate Secret (`kubernetes.io/tls`).
pub const TLS_SECRET_KEYS: [&str; 2] = ["tls.crt", "tls.key"];

/// A Secret as a volume of 0440 files (readable by the pod's group): all of
/// its keys, or only `items` (key, file name) when given.
fn secret_volume(volume: &str, secret: &str, items: Option<&[(&str, &str)]>) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            items: items.map(|items| {
                items
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: (*key).into(),
                        path: (*path).into(),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn read_only_mount(volume: &str, dir: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: dir.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn owner(tp: &TokenPolicy) -> Vec<OwnerReference> {
    tp.controller_owner_ref(&()).into_iter().collect()
}

fn meta(tp: &TokenPolicy, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: tp.namespace(),
        labels: Some(labels(tp)),
        owner_references: Some(owner(tp)),
        ..Default::default()
    }
}

/// The signing-key Secret holding the key ring (see `rotation.rs`).
pub fn signing_secret(tp: &TokenPolicy, ring: &KeyRing) -> Secret {
    let data = rotation::in_order(ring)
        .into_iter()
        .map(|(file, pem)| (file.to_string(), pem.to_string()))
        .collect();
    let mut annotations = BTreeMap::new();
    if let Some(r) = &ring.rotated_for {
        annotations.insert(ROTATED_FOR_ANNOTATION.to_string(), r.clone());
    }
    if let Some(t) = ring.promoted_at {
        annotations.insert(PROMOTED_AT_ANNOTATION.to_string(), t.to_string());
    }
    let mut m = meta(tp, signing_secret_name(tp));
    m.annotations = (!annotations.is_empty()).then_some(annotations);
    Secret {
        metadata: m,
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

pub fn service_account(tp: &TokenPolicy) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(tp, object_name(tp)),
        automount_service_account_token: Some(true),
        ..Default::default()
    }
}

/// The least the token service needs: read and watch its own TokenPolicy.
pub fn role(tp: &TokenPolicy) -> Role {
    Role {
        metadata: meta(tp, object_name(tp)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["auth.tokenpolicy.io".into()]),
            resources: Some(vec!["tokenpolicies".into()]),
            resource_names: Some(vec![tp.name_any()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    }
}

pub fn role_binding(tp: &TokenPolicy) -> RoleBinding {
    RoleBinding {
        metadata: meta(tp, object_name(tp)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: object_name(tp),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: object_name(tp),
            namespace: tp.namespace(),
            ..Default::default()
        }]),
    }
}

pub fn service(tp: &TokenPolicy) -> Service {
    Service {
        metadata: meta(tp, object_name(tp)),
        spec: Some(ServiceSpec {
            selector: Some(selector(tp)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn pdb(tp: &TokenPolicy) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(tp, object_name(tp)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(tp)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Who may reach the token service pods (`--token-service-network-policy`,
/// the chart's `tokenService.networkPolicy`): the ingress controllers that
/// call forward-auth and serve the sign-in page, and the metrics scraper.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyConfig {
    /// The ingress controllers (NetworkPolicyPeers).
    #[serde(default)]
    pub from: Vec<NetworkPolicyPeer>,
    /// The metrics scraper (NetworkPolicyPeers).
    #[serde(default)]
    pub metrics_from: Vec<NetworkPolicyPeer>,
}

/// Ingress to the token service pods only from the configured peers: the
/// ingress controllers on the HTTP port, the metrics scraper on the metrics
/// port. A list left empty admits any source, on its port only. Egress is
/// left open: Redis and the API server are wherever the cluster keeps them.
pub fn network_policy(tp: &TokenPolicy, config: &NetworkPolicyConfig) -> NetworkPolicy {
    let rule = |peers: &[NetworkPolicyPeer], port: i32| NetworkPolicyIngressRule {
        from: (!peers.is_empty()).then(|| peers.to_vec()),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    NetworkPolicy {
        metadata: meta(tp, object_name(tp)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(tp)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                rule(&config.from, PORT),
                rule(&config.metrics_from, METRICS_PORT),
            ]),
            ..Default::default()
        }),
    }
}

fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q("50m")),
            ("memory".into(), q("32Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), q("128Mi"))])),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// Has the token service write its audit trail to standard output
/// (`--audit-log -`), the container's log; its diagnostic log stays on
/// standard error.
pub fn audit_to_stdout(d: &mut Deployment) {
    let containers = d.spec.template.spec.as_mut().map(|p| &mut p.containers);
    for c in containers.into_iter().flatten() {
        if c.name == "token-service" {
            c.args
                .get_or_insert_with(Vec::new)
                .extend(["--audit-log".into(), "-".into()]);
        }
    }
}

/// The token service. `keys` names the kids in the signing-key Secret (first
/// signs): a change rolls the pods, which read their keys when they start.
/// `default_trusted` are the trusted proxies when the spec names none.
pub fn deployment(
    tp: &TokenPolicy,
    default_image: &str,
    default_trusted: &[String],
    keys: &str,
) -> Deployment {
    let spec = &tp.spec;
    let namespace = tp.namespace().unwrap_or_else(|| "default".into());
    let mut args = vec![
        "serve".to_string(),
        "--policy-ref".into(),
        format!("{namespace}/{}", tp.name_any()),
        "--listen".into(),
        format!("0.0.0.0:{PORT}"),
        // Probes and metrics on a port of their own: a flood of clients on
        // the public port cannot make the kubelet restart the pods.
        "--metrics-listen".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
        "--log-format".into(),
        "json".into(),
        "--signing-keys-dir".into(),
        KEYS_DIR.into(),
    ];
    let trusted = spec.trusted_proxies.as_deref().unwrap_or(default_trusted);
    if !trusted.is_empty() {
        args.extend(["--trusted-proxies".into(), trusted.join(",")]);
    }
    let mut env = Vec::new();
    let mut volumes = vec![secret_volume(
        "signing-keys",
        &signing_secret_name(tp),
        None,
    )];
    let mut mounts = vec![read_only_mount("signing-keys", KEYS_DIR)];
    if let Some(users) = &spec.users {
        // Only the named key, as a file in a directory (not subPath, so
        // that kubelet updates reach the running service, which re-reads
        // the file): the Secret's other keys never reach the pod.
        volumes.push(secret_volume(
            "users",
            &users.secret_ref.name,
            Some(&[(&users.secret_ref.key, USERS_FILE)]),
        ));
        mounts.push(read_only_mount("users", USERS_DIR));
        args.extend(["--users".into(), format!("{USERS_DIR}/{USERS_FILE}")]);
    }
    if let Some(oidc) = &spec.oidc {
        let secret = &oidc.client_secret_ref;
        volumes.push(secret_volume(
            "oidc",
            &secret.name,
            Some(&[(&secret.key, "client-secret")]),
        ));
        mounts.push(read_only_mount("oidc", OIDC_DIR));
        args.extend([
            "--oidc-client-secret-file".into(),
            format!("{OIDC_DIR}/client-secret"),
        ]);
        if let Some(ca) = &oidc.ca_secret_ref {
            volumes.push(secret_volume(
                "oidc-ca",
                &ca.name,
                Some(&[(&ca.key, "ca.crt")]),
            ));
            mounts.push(read_only_mount("oidc-ca", OIDC_CA_DIR));
            args.extend(["--oidc-ca-file".into(), format!("{OIDC_CA_DIR}/ca.crt")]);
        }
    }
    if let Some(redis) = &spec.redis {
        env.push(EnvVar {
            name: "TOKENPOLICY_REDIS".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: redis.url_secret_ref.name.clone(),
                    key: redis.url_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "TOKENPOLICY_REDIS_PREFIX".into(),
            value: Some(format!("tokenpolicy:{namespace}/{}", tp.name_any())),
            ..Default::default()
        });
        let tls = redis.tls.as_ref();
        if let Some(ca) = tls.and_then(|t| t.ca_secret_ref.as_ref()) {
            volumes.push(secret_volume(
                "redis-ca",
                &ca.name,
                Some(&[(&ca.key, "ca.crt")]),
            ));
            mounts.push(read_only_mount("redis-ca", REDIS_CA_DIR));
            args.extend(["--redis-ca-file".into(), format!("{REDIS_CA_DIR}/ca.crt")]);
        }
        if let Some(client) = tls.and_then(|t| t.client_secret_name.as_ref()) {
            let files = TLS_SECRET_KEYS.map(|k| (k, k));
            volumes.push(secret_volume("redis-client", client, Some(&files)));
            mounts.push(read_only_mount("redis-client", REDIS_CLIENT_DIR));
            let [cert, key] = TLS_SECRET_KEYS.map(|k| format!("{REDIS_CLIENT_DIR}/{k}"));
            args.extend([
                "--redis-client-cert".into(),
                cert,
                "--redis-client-key".into(),
                key,
            ]);
        }
    }
    let container = Container {
        name: "token-service".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| default_image.to_string()),
        ),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut template_labels = labels(tp);
    template_labels.retain(|k, _| k != "app.kubernetes.io/managed-by");
    Deployment {
        metadata: meta(tp, object_name(tp)),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(tp)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    annotations: Some(BTreeMap::from([(
                        KEYS_ANNOTATION.to_string(),
                        keys.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(object_name(tp)),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        // Secret volumes are root-owned: the group makes the
                        // 0440 key and users files readable by uid 65532.
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{RedisSpec, RedisTlsSpec, SecretKeyRef, TokenPolicySpec, UsersSpec};

    /// A TokenPolicy `team/demo` with a users Secret, and Redis above one replica.
    pub(crate) fn policy(replicas: i32) -> TokenPolicy {
        let mut tp = TokenPolicy::new(
            "demo",
            TokenPolicySpec {
                replicas,
                users: Some(UsersSpec {
                    secret_ref: SecretKeyRef {
                        name: "demo-users".into(),
                        key: "users".into(),
                    },
                }),
                redis: (replicas > 1).then(|| RedisSpec {
                    url_secret_ref: SecretKeyRef {
                        name: "redis".into(),
                        key: "url".into(),
                    },
                    tls: None,
                }),
                ..Default::default()
            },
        );
        tp.metadata.namespace = Some("team".into());
        tp.metadata.uid = Some("uid-1".into());
        tp.metadata.generation = Some(1);
        tp
    }

    /// The Secret of volume `name` and its (key, file) items; every Secret
    /// volume is mode 0440.
    fn secret_files(volumes: &[Volume], name: &str) -> (String, Vec<(String, String)>) {
        let s = volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap()
            .secret
            .clone()
            .unwrap();
        assert_eq!(s.default_mode, Some(0o440));
        let items = s
            .items
            .unwrap()
            .into_iter()
            .map(|i| (i.key, i.path))
            .collect();
        (s.secret_name.unwrap(), items)
    }

    #[test]
    fn redis_tls_secrets_become_read_only_files_that_serve_is_told_of() {
        let pod_of = |tp: &TokenPolicy| {
            deployment(tp, "img:1", &[], "kid-a")
                .spec
                .template
                .spec
                .unwrap()
        };
        let plain = pod_of(&policy(3));
        assert!(
            !plain.containers[0]
                .args
                .as_ref()
                .unwrap()
                .join(" ")
                .contains("--redis-c")
        );
        assert_eq!(
            plain.volumes.as_ref().unwrap().len(),
            2,
            "signing keys and users only"
        );

        let mut tp = policy(3);
        tp.spec.redis.as_mut().unwrap().tls = Some(RedisTlsSpec {
            ca_secret_ref: Some(SecretKeyRef {
                name: "redis-ca".into(),
                key: "ca.pem".into(),
            }),
            client_secret_name: Some("redis-client".into()),
        });
        let pod = pod_of(&tp);
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap();
        let joined = args.join(" ");
        assert!(
            joined.contains("--redis-ca-file /etc/tokenpolicy/redis-ca/ca.crt"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "--redis-client-cert /etc/tokenpolicy/redis-client/tls.crt \
                 --redis-client-key /etc/tokenpolicy/redis-client/tls.key"
            ),
            "{joined}"
        );
        let volumes = pod.volumes.unwrap();
        let files = |name: &str| secret_files(&volumes, name);
        let pair = |k: &str, p: &str| (k.to_string(), p.to_string());
        assert_eq!(
            files("redis-ca"),
            ("redis-ca".into(), vec![pair("ca.pem", "ca.crt")])
        );
        assert_eq!(
            files("redis-client"),
            (
                "redis-client".into(),
                vec![pair("tls.crt", "tls.crt"), pair("tls.key", "tls.key")]
            )
        );
        for (name, dir) in [
            ("redis-ca", "/etc/tokenpolicy/redis-ca"),
            ("redis-client", "/etc/tokenpolicy/redis-client"),
        ] {
            let m = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == name)
                .unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (dir, Some(true)));
        }
        // The service takes these flags (its URL comes from TOKENPOLICY_REDIS).
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: crate::service::serve::ServeArgs,
            /// The binary's own flag, beside `serve`'s.
            #[arg(long)]
            log_format: String,
        }
        let argv = std::iter::once("tokenpolicy")
            .chain(args[1..].iter().map(String::as_str))
            .chain(["--redis", "rediss://redis:6380/"]);
        let parsed = <Serve as clap::Parser>::try_parse_from(argv).unwrap().args;
        assert_eq!(
            parsed.redis_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/tokenpolicy/redis-ca/ca.crt"))
        );
        assert!(parsed.redis_client_cert.is_some() && parsed.redis_client_key.is_some());
    }

    /// The operator's `--token-service-audit-log`: the token service gets
    /// `--audit-log -`, which `serve` takes; without it, no audit flag.
    #[test]
    fn the_audit_trail_goes_to_the_containers_stdout() {
        let args = |d: &Deployment| {
            d.spec.template.spec.as_ref().unwrap().containers[0]
                .args
                .clone()
                .unwrap()
        };
        let plain = deployment(&policy(1), "img:1", &[], "kid-a");
        assert!(!args(&plain).iter().any(|a| a == "--audit-log"));
        let mut d = plain.clone();
        audit_to_stdout(&mut d);
        let argv = args(&d);
        assert_eq!(argv[argv.len() - 2..], ["--audit-log", "-"]);
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: crate::service::serve::ServeArgs,
            #[arg(long)]
            log_format: String,
        }
        let parsed = <Serve as clap::Parser>::try_parse_from(
            std::iter::once("tokenpolicy").chain(argv[1..].iter().map(String::as_str)),
        )
        .unwrap()
        .args;
        assert_eq!(parsed.audit_log.as_deref(), Some("-"));
    }

    #[test]
    fn deployment_runs_serve_for_this_policy_hardened() {
        let d = deployment(&policy(3), "img:1", &[], "kid-a");
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("tokenpolicy-demo")
        );
        assert_eq!(d.metadata.name.as_deref(), Some("tokenpolicy-demo"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.starts_with("serve --policy-ref team/demo --listen 0.0.0.0:8080"),
            "{args}"
        );
        assert!(args.contains("--signing-keys-dir /etc/tokenpolicy/keys"));
        // The kubelet probes a port of their own, never the public one.
        assert!(args.contains("--metrics-listen 0.0.0.0:9090"), "{args}");
        for p in [&c.liveness_probe, &c.readiness_probe] {
            let port = &p.as_ref().unwrap().http_get.as_ref().unwrap().port;
            assert_eq!(port, &IntOrString::String("metrics".into()));
        }
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [("http".to_string(), 8080), ("metrics".to_string(), 9090)]
        );
        assert!(args.contains("--users /etc/tokenpolicy/users/users"));
        let env = c.env.clone().unwrap();
        let redis = env.iter().find(|e| e.name == "TOKENPOLICY_REDIS").unwrap();
        let sel = redis
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("redis", "url"));
        let pod_sc = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_sc.fs_group, Some(65532));
        assert_eq!(
            c.security_context.as_ref().unwrap().run_as_group,
            Some(65532)
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        assert!(c.resources.is_some());
        let owner = &d.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("TokenPolicy", "demo", Some(true))
        );
    }

    #[test]
    fn the_oidc_client_secret_and_ca_are_single_read_only_files_that_serve_is_told_of() {
        let mut tp = policy(1);
        tp.spec.oidc = Some(crate::crd::OidcSpec {
            issuer_url: "https://idp.example.com".into(),
            client_id: "tokenpolicy".into(),
            client_secret_ref: SecretKeyRef {
                name: "oidc-client".into(),
                key: "secret".into(),
            },
            ca_secret_ref: Some(SecretKeyRef {
                name: "idp-ca".into(),
                key: "ca.pem".into(),
            }),
            ..Default::default()
        });
        let pod = deployment(&tp, "img:1", &[], "kid-a")
            .spec
            .template
            .spec
            .unwrap();
        let args = pod.containers[0].args.clone().unwrap().join(" ");
        assert!(
            args.contains("--oidc-client-secret-file /etc/tokenpolicy/oidc/client-secret"),
            "{args}"
        );
        assert!(
            args.contains("--oidc-ca-file /etc/tokenpolicy/oidc-ca/ca.crt"),
            "{args}"
        );
        let volumes = pod.volumes.unwrap();
        let only = |name: &str| secret_files(&volumes, name);
        assert_eq!(
            only("oidc"),
            (
                "oidc-client".to_string(),
                vec![("secret".to_string(), "client-secret".to_string())]
            )
        );
        assert_eq!(
            only("oidc-ca"),
            (
                "idp-ca".to_string(),
                vec![("ca.pem".to_string(), "ca.crt".to_string())]
            )
        );
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        for (name, dir) in [
            ("oidc", "/etc/tokenpolicy/oidc"),
            ("oidc-ca", "/etc/tokenpolicy/oidc-ca"),
        ] {
            let m = mounts.iter().find(|m| m.name == name).unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (dir, Some(true)));
        }
    }

    #[test]
    fn only_the_named_key_of_the_users_secret_reaches_the_pod() {
        let mut tp = policy(1);
        tp.spec.users.as_mut().unwrap().secret_ref.key = "team-users".into();
        let pod = deployment(&tp, "img:1", &[], "kid-a")
            .spec
            .template
            .spec
            .unwrap();
        let users = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "users")
            .unwrap()
            .secret
            .unwrap();
        assert_eq!(users.secret_name.as_deref(), Some("demo-users"));
        let items: Vec<_> = users
            .items
            .unwrap()
            .into_iter()
            .map(|i| (i.key, i.path))
            .collect();
        assert_eq!(items, [("team-users".to_string(), "users".to_string())]);
        let args = pod.containers[0].args.clone().unwrap().join(" ");
        assert!(
            args.contains("--users /etc/tokenpolicy/users/users"),
            "{args}"
        );
    }

    #[test]
    fn without_peers_the_network_policy_still_admits_only_the_two_ports() {
        let np = network_policy(&policy(1), &NetworkPolicyConfig::default());
        assert_eq!(np.metadata.name.as_deref(), Some("tokenpolicy-demo"));
        let rules = np.spec.unwrap().ingress.unwrap();
        let ports: Vec<_> = rules
            .iter()
            .map(|r| {
                assert_eq!(r.from, None);
                r.ports.as_ref().unwrap()[0].port.clone()
            })
            .collect();
        assert_eq!(
            ports,
            [Some(IntOrString::Int(8080)), Some(IntOrString::Int(9090))]
        );
    }

    #[test]
    fn trusted_proxies_come_from_the_spec_else_the_operator() {
        let args = |tp: &TokenPolicy, default: &[String]| {
            deployment(tp, "img", default, "kid-a")
                .spec
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap()
                .join(" ")
        };
        let value = |joined: String| {
            let argv: Vec<&str> = joined.split(' ').collect();
            let at = argv.iter().position(|a| *a == "--trusted-proxies")?;
            argv.get(at + 1).map(|v| v.to_string())
        };
        let mut tp = policy(1);
        assert!(!args(&tp, &[]).contains("--trusted-proxies"));
        assert!(!args(&tp, &[]).contains("--trust-forwarded-for"));
        let default = ["10.0.0.0/8".to_string()];
        assert_eq!(value(args(&tp, &default)).as_deref(), Some("10.0.0.0/8"));
        tp.spec.trusted_proxies = Some(vec!["10.1.0.0/16".into(), "fd00::/8".into()]);
        assert_eq!(
            value(args(&tp, &default)).as_deref(),
            Some("10.1.0.0/16,fd00::/8")
        );
        // Named as none: none, whatever the operator's default.
        tp.spec.trusted_proxies = Some(vec![]);
        assert!(!args(&tp, &default).contains("--trusted-proxies"));
    }

    #[test]
    fn a_new_key_ring_rolls_the_pods_but_not_the_arguments() {
        let before = deployment(&policy(1), "img", &[], "kid-a");
        let after = deployment(&policy(1), "img", &[], "kid-a,kid-b");
        let pod = |d: &Deployment| d.spec.template.clone();
        let args = |d: &Deployment| pod(d).spec.unwrap().containers[0].args.clone();
        // Arguments stay: a pod restarting mid-rotation reads whatever ring is mounted.
        assert_eq!(args(&before), args(&after));
        let ann = |d: &Deployment| pod(d).metadata.unwrap().annotations.unwrap();
        assert_ne!(ann(&before), ann(&after));
    }

    #[test]
    fn signing_secret_holds_the_ring_in_order() {
        let ring = KeyRing {
            signing: "S".into(),
            next: Some("N".into()),
            previous: None,
            rotated_for: Some("v1".into()),
            promoted_at: None,
        };
        let s = signing_secret(&policy(1), &ring);
        let data = s.string_data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["next.pem", "signing.pem"]);
        let ann = s.metadata.annotations.unwrap();
        assert_eq!(
            ann.get(ROTATED_FOR_ANNOTATION).map(String::as_str),
            Some("v1")
        );
        assert!(!ann.contains_key(PROMOTED_AT_ANNOTATION));
    }

    #[test]
    fn role_allows_only_reading_its_own_policy() {
        let r = role(&policy(1));
        let rules = r.rules.clone().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["demo".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        let b = role_binding(&policy(1));
        assert_eq!(r.metadata.name.as_deref(), Some("tokenpolicy-demo"));
        assert_eq!(b.role_ref.name, "tokenpolicy-demo");
        assert_eq!(b.subjects.unwrap()[0].name, "tokenpolicy-demo");
    }

    #[test]
    fn endpoint_and_service() {
        assert_eq!(
            endpoint(&policy(1)),
            "http://tokenpolicy-demo.team.svc.cluster.local:8080/v1/verify"
        );
        let svc = service(&policy(1));
        assert_eq!(svc.metadata.name.as_deref(), Some("tokenpolicy-demo"));
        let s = svc.spec.unwrap();
        assert_eq!(s.ports.unwrap()[0].port, 8080);
        let sel = s.selector.unwrap();
        assert_eq!(
            sel.get("app.kubernetes.io/instance").map(String::as_str),
            Some("demo")
        );
        assert_eq!(
            sel.get("app.kubernetes.io/component").map(String::as_str),
            Some("token-service")
        );
    }
}
