// Package kubestore keeps keyfs records in the Kubernetes API: one
// SealedKey object per key, the cluster master's public key in the
// KeyfsCluster "default". Types are written by hand (no code generation)
// and reached through client-go's REST client and shared informer.
package kubestore

import (
	"slices"

	"github.com/keyfs/keyfs/keystore"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// GroupVersion of keyfs's custom resources (manifests/crds).
var GroupVersion = schema.GroupVersion{Group: "keyfs.dev", Version: "v1alpha1"}

// sealedKeyType is every SealedKey's type.
var sealedKeyType = metav1.TypeMeta{APIVersion: GroupVersion.String(), Kind: "SealedKey"}

// SealedKey holds one record: ciphertext, safe in Git and in etcd.
type SealedKey struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SealedKeySpec `json:"spec"`

	// The record parsed once, or why it does not parse: for a listing,
	// and in what Watch's onChange hears of (cached.sealedKey).
	parsed bool
	rec    *keystore.Record
	recErr error
	writer string // its newest field manager, from managedFields (dropped)
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
	KID           string        `json:"kid"`
	PublicKey     string        `json:"publicKey"`
	BootstrapNode string        `json:"bootstrapNode,omitempty"`
	Older         []OlderMaster `json:"older,omitempty"`
}

// OlderMaster is a master of the ring that no longer seals.
type OlderMaster struct {
	KID       string `json:"kid"`
	PublicKey string `json:"publicKey"`
}

// KeyfsClusterList is a list of KeyfsClusters.
type KeyfsClusterList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KeyfsCluster `json:"items"`
}

// KeyfsNode is one node's enrollment: its TPM's endorsement key, an
// admin's approval of it, and the cluster seed wrapped to it.
type KeyfsNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              KeyfsNodeSpec   `json:"spec"`
	Status            KeyfsNodeStatus `json:"status,omitempty"`
}

// KeyfsNodeSpec is written by the node (EK) and by an admin (approval).
type KeyfsNodeSpec struct {
	EKPublic       []byte `json:"ekPublic"`
	EKHash         string `json:"ekHash"`
	EKCertificate  []byte `json:"ekCertificate,omitempty"`
	ApprovedEKHash string `json:"approvedEKHash,omitempty"`
}

// Enrollment states.
const (
	StateWaiting  = "WaitingForApproval"
	StateApproved = "Approved"
	StateIssued   = "Issued"
	StateEnrolled = "Enrolled"
	StateFailed   = "Failed"
)

// KeyfsNodeStatus is written by daemons: the node's own state, and the
// enrollment an enrolled node issues.
type KeyfsNodeStatus struct {
	State      string       `json:"state,omitempty"`
	Message    string       `json:"message,omitempty"`
	Since      *metav1.Time `json:"since,omitempty"`
	KID        string       `json:"kid,omitempty"`
	Enrollment *Enrollment  `json:"enrollment,omitempty"`
}

// Enrollment is the cluster seed wrapped to one EK (TPM2_Import's inputs).
type Enrollment struct {
	EKName    []byte `json:"ekName"`
	Public    []byte `json:"public"`
	Duplicate []byte `json:"duplicate"`
	Seed      []byte `json:"seed"`
	KID       string `json:"kid"`
	IssuedBy  string `json:"issuedBy"`
}

// KeyfsNodeList is a list of KeyfsNodes.
type KeyfsNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KeyfsNode `json:"items"`
}

func (o *KeyfsNode) DeepCopyObject() runtime.Object {
	c := *o
	o.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Spec.EKPublic = slices.Clone(o.Spec.EKPublic)
	c.Spec.EKCertificate = slices.Clone(o.Spec.EKCertificate)
	if o.Status.Since != nil {
		c.Status.Since = o.Status.Since.DeepCopy()
	}
	if o.Status.Enrollment != nil {
		e := *o.Status.Enrollment
		c.Status.Enrollment = &e
	}
	return &c
}

func (o *KeyfsNodeList) DeepCopyObject() runtime.Object {
	c := *o
	c.Items = make([]KeyfsNode, len(o.Items))
	for i := range o.Items {
		c.Items[i] = *o.Items[i].DeepCopyObject().(*KeyfsNode)
	}
	return &c
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

// slimList is the informer's list of SealedKeys, slim (cached), by
// pointer: the informer takes the items as they are, no copy of each.
type slimList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []*cached `json:"items"`
}

func (o *slimList) DeepCopyObject() runtime.Object {
	c := *o
	c.Items = make([]*cached, len(o.Items))
	for i, it := range o.Items {
		c.Items[i] = it.DeepCopyObject().(*cached)
	}
	return &c
}

func (o *KeyfsCluster) DeepCopyObject() runtime.Object {
	c := *o
	o.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Spec.Older = slices.Clone(o.Spec.Older)
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
	scheme.AddKnownTypes(GroupVersion, &SealedKey{}, &SealedKeyList{}, &KeyfsCluster{}, &KeyfsClusterList{}, &KeyfsNode{}, &KeyfsNodeList{})
	metav1.AddToGroupVersion(scheme, GroupVersion)
}
