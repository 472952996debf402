package kubestore

import (
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyfs/keyfs/keystore"
)

// GetNode returns node's KeyfsNode.
func (c *Client) GetNode(node string) (*KeyfsNode, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var o KeyfsNode
	if err := c.rest.Get().Resource("keyfsnodes").Name(node).Do(ctx).Into(&o); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: no KeyfsNode %s: its keyfs serve --store kubernetes creates it (keyfs node ls lists them)", keystore.ErrNotFound, node)
		}
		return nil, apiError("get KeyfsNode "+node, err)
	}
	return &o, nil
}

// ListNodes lists every KeyfsNode.
func (c *Client) ListNodes() ([]KeyfsNode, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var l KeyfsNodeList
	if err := c.rest.Get().Resource("keyfsnodes").Do(ctx).Into(&l); err != nil {
		return nil, apiError("list KeyfsNodes", err)
	}
	return l.Items, nil
}

// RegisterNode creates node's KeyfsNode with its EK, or brings the EK of
// an existing one up to date (a node with a new TPM: any approval of the
// old EK then no longer matches).
func (c *Client) RegisterNode(node string, ekPublic []byte, ekHash string, ekCert []byte) (*KeyfsNode, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	spec := KeyfsNodeSpec{EKPublic: ekPublic, EKHash: ekHash, EKCertificate: ekCert}
	o := &KeyfsNode{TypeMeta: metav1.TypeMeta{APIVersion: GroupVersion.String(), Kind: "KeyfsNode"}, ObjectMeta: metav1.ObjectMeta{Name: node}, Spec: spec}
	var out KeyfsNode
	err := c.rest.Post().Resource("keyfsnodes").Body(o).Do(ctx).Into(&out)
	if err == nil {
		return &out, nil
	}
	if !apierrors.IsAlreadyExists(err) {
		return nil, apiError("create KeyfsNode "+node, err)
	}
	old, err := c.GetNode(node)
	if err != nil {
		return nil, err
	}
	if old.Spec.EKHash == ekHash && string(old.Spec.EKPublic) == string(ekPublic) {
		return old, nil
	}
	old.Spec.EKPublic, old.Spec.EKHash, old.Spec.EKCertificate = ekPublic, ekHash, ekCert
	if err := c.rest.Put().Resource("keyfsnodes").Name(node).Body(old).Do(ctx).Into(&out); err != nil {
		return nil, apiError("update KeyfsNode "+node, err)
	}
	return &out, nil
}

// Approve records an admin's approval of node's EK. ekHash, if not empty,
// must be the EK the node registered: what the admin compared.
func (c *Client) Approve(node, ekHash string) (*KeyfsNode, error) {
	o, err := c.GetNode(node)
	if err != nil {
		return nil, err
	}
	if ekHash != "" && ekHash != o.Spec.EKHash {
		return nil, fmt.Errorf("%w: KeyfsNode %s registered EK %s, not %s: check keyfs node ek on that node", keystore.ErrIntegrity, node, o.Spec.EKHash, ekHash)
	}
	o.Spec.ApprovedEKHash = o.Spec.EKHash
	ctx, cancel := c.ctx()
	defer cancel()
	var out KeyfsNode
	if err := c.rest.Put().Resource("keyfsnodes").Name(node).Body(o).Do(ctx).Into(&out); err != nil {
		return nil, apiError("approve KeyfsNode "+node, err)
	}
	// An enrollment the node refused stays in its status, and issuers skip
	// a node that has one: approving again drops it, so one is issued anew.
	if out.Status.State == StateFailed && out.Status.Enrollment != nil {
		out.Status = KeyfsNodeStatus{State: StateApproved, Message: "approved again; the enrollment it refused was dropped, a node holding the cluster master issues a new one"}
		o, err := c.SetNodeStatus(&out)
		if err != nil {
			return nil, err
		}
		return o, nil
	}
	return &out, nil
}

// SetNodeStatus writes o's status, if o is still current: of writers
// racing, one wins and the others get an error wrapping ErrConflict.
func (c *Client) SetNodeStatus(o *KeyfsNode) (*KeyfsNode, error) {
	if o.Status.Since == nil {
		now := metav1.NewTime(time.Now())
		o.Status.Since = &now
	}
	ctx, cancel := c.ctx()
	defer cancel()
	var out KeyfsNode
	if err := c.rest.Put().Resource("keyfsnodes").Name(o.Name).SubResource("status").Body(o).Do(ctx).Into(&out); err != nil {
		return nil, apiError("update the status of KeyfsNode "+o.Name, err)
	}
	return &out, nil
}
