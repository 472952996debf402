// Package kubestore keeps keyfs records in the Kubernetes API: one
// SealedKey object per key, the cluster master's public key in the
// KeyfsCluster "default". Types are written by hand (no code generation)
// and reached through client-go's REST client and shared informer.
package kubestore

import (
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// GroupVersion of keyfs's custom resources (manifests/crds).
var GroupVersion = schema.GroupVersion{Group: "keyfs.dev", Version: "v1alpha1"}

// SealedKey holds one record: ciphertext, safe in Git and in etcd.
type SealedKey struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SealedKeySpec `json:"spec"`
}

// SealedKeySpec names the key and carries its record armor.
type SealedKeySpec struct {
	Tenant string `json:"tenant"`
	Name   string `json:"name"`
	Record string `json:"record"`
}

// SealedKeyList is a list of SealedKeys.
type SealedKeyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SealedKey `json:"items"`
}

// KeyfsCluster "default" names the cluster master key.
type KeyfsCluster struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              KeyfsClusterSpec `json:"spec"`
}

// KeyfsClusterSpec is the master's kid and public key armor.
type KeyfsClusterSpec struct {
	KID           string `json:"kid"`
	PublicKey     string `json:"publicKey"`
	BootstrapNode string `json:"bootstrapNode,omitempty"`
}

// KeyfsClusterList is a list of KeyfsClusters.
type KeyfsClusterList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KeyfsCluster `json:"items"`
}

// ClusterName is the one KeyfsCluster's name.
const ClusterName = "default"

func (o *SealedKey) DeepCopyObject() runtime.Object {
	c := *o
	o.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	return &c
}

func (o *SealedKeyList) DeepCopyObject() runtime.Object {
	c := *o
	c.Items = make([]SealedKey, len(o.Items))
	for i := range o.Items {
		c.Items[i] = *o.Items[i].DeepCopyObject().(*SealedKey)
	}
	return &c
}

func (o *KeyfsCluster) DeepCopyObject() runtime.Object {
	c := *o
	o.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	return &c
}

func (o *KeyfsClusterList) DeepCopyObject() runtime.Object {
	c := *o
	c.Items = make([]KeyfsCluster, len(o.Items))
	for i := range o.Items {
		c.Items[i] = *o.Items[i].DeepCopyObject().(*KeyfsCluster)
	}
	return &c
}

var (
	scheme         = runtime.NewScheme()
	codecs         = serializer.NewCodecFactory(scheme)
	parameterCodec = runtime.NewParameterCodec(scheme)
)

func init() {
	scheme.AddKnownTypes(GroupVersion, &SealedKey{}, &SealedKeyList{}, &KeyfsCluster{}, &KeyfsClusterList{})
	metav1.AddToGroupVersion(scheme, GroupVersion)
}
