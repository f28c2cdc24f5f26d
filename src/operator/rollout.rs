//! Where the token service's rollout stands, as the applied Deployment
//! reports it. Both the status conditions and the rotation plan read it.

use k8s_openapi::api::apps::v1::Deployment;

use crate::operator::names;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    /// The deployment controller has seen the current template.
    pub current: bool,
    /// The replicas the Deployment asks for.
    pub want: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    pub replicas: i32,
    /// The kids annotation of the pod template (first signs).
    pub template_kids: Option<String>,
}

impl Rollout {
    pub fn of(d: &Deployment) -> Rollout {
        let st = d.status.clone().unwrap_or_default();
        Rollout {
            current: st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
            want: d.spec.replicas.unwrap_or(1),
            ready: st.ready_replicas.unwrap_or(0),
            updated: st.updated_replicas.unwrap_or(0),
            available: st.available_replicas.unwrap_or(0),
            replicas: st.replicas.unwrap_or(0),
            template_kids: d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(names::KEYS_ANNOTATION))
                .cloned(),
        }
    }

    pub fn in_progress(&self) -> bool {
        !self.current || self.updated < self.want || self.replicas > self.want
    }

    /// Every replica runs the pod template carrying `kids`.
    pub fn complete_with(&self, kids: &str) -> bool {
        self.template_kids.as_deref() == Some(kids)
            && self.current
            && self.updated == self.want
            && self.available == self.want
            && self.replicas == self.want
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn done(kids: &str, want: i32) -> Rollout {
        Rollout {
            current: true,
            want,
            ready: want,
            updated: want,
            available: want,
            replicas: want,
            template_kids: Some(kids.into()),
        }
    }

    #[test]
    fn complete_only_when_every_replica_runs_the_template_with_those_kids() {
        let r = done("a,b", 2);
        assert!(r.complete_with("a,b"));
        assert!(!r.in_progress());
        assert!(!r.complete_with("a"), "another template");
        let not = [
            Rollout {
                current: false,
                ..r.clone()
            },
            Rollout {
                updated: 1,
                ..r.clone()
            },
            Rollout {
                available: 1,
                ..r.clone()
            },
            // An old pod is still terminating.
            Rollout {
                replicas: 3,
                ..r.clone()
            },
            Rollout {
                template_kids: None,
                ..r.clone()
            },
        ];
        for n in not {
            assert!(!n.complete_with("a,b"), "{n:?}");
        }
        assert!(
            Rollout {
                replicas: 3,
                ..r.clone()
            }
            .in_progress()
        );
        assert!(
            Rollout {
                updated: 1,
                ..r.clone()
            }
            .in_progress()
        );
        assert!(
            Rollout {
                current: false,
                ..r
            }
            .in_progress()
        );
    }

    #[test]
    fn read_from_the_applied_deployment() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo", "generation": 2},
            "spec": {"replicas": 3, "selector": {},
                     "template": {"metadata": {"annotations": {names::KEYS_ANNOTATION: "k1,k2"}}}},
            "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3,
                       "readyReplicas": 2, "availableReplicas": 3}
        }))
        .unwrap();
        let r = Rollout::of(&d);
        assert_eq!(
            r,
            Rollout {
                current: true,
                want: 3,
                ready: 2,
                updated: 3,
                available: 3,
                replicas: 3,
                template_kids: Some("k1,k2".into()),
            }
        );
        assert!(r.complete_with("k1,k2"));
        let mut stale = d;
        stale.status.as_mut().unwrap().observed_generation = Some(1);
        assert!(!Rollout::of(&stale).current);
    }
}
