# Pinned versions of the components that tests/e2e/cluster.sh builds from the
# Go module proxy. Changing one changes the cache directory they land in.
K8S_VERSION=v1.36.3     # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
ETCD_VERSION=v3.7.3     # go.etcd.io/etcd/server/v3
KWOK_VERSION=v0.8.0     # sigs.k8s.io/kwok
HELM_VERSION=v4.3.2     # helm.sh/helm/v4
# The real node (tests/e2e/build_node.sh): kubelet comes from K8S_VERSION.
CONTAINERD_VERSION=v2.4.2       # github.com/containerd/containerd/v2
RUNC_VERSION=v1.5.3             # github.com/opencontainers/runc
CNI_PLUGINS_VERSION=v1.10.0     # github.com/containernetworking/plugins
