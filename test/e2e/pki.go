package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

// writePKI makes the cluster's certificates (ECDSA P-256, valid one day)
// and kubeconfigs under ROOT/pki:
//
//	ca            signs everything below
//	apiserver     serving, localhost / 127.0.0.1 / kubernetes.default.svc
//	admin         client, O=system:masters: the harness, the controller
//	              manager, the scheduler, and the API server to kubelet
//	kubelet       serving, localhost / 127.0.0.1
//	kubelet-client client, O=system:nodes CN=system:node:localhost
//	kubelet-b-client client, O=system:nodes CN=system:node:node-b
//	sa            service account token signing key pair
func (h *harness) writePKI() error {
	dir := h.path("pki")
	now := time.Now().Add(-time.Hour)
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keyfs-e2e-ca"},
		NotBefore: now, NotAfter: now.Add(25 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(dir+"/ca.crt", "CERTIFICATE", caDER); err != nil {
		return err
	}
	serial := int64(2)
	issue := func(name string, subject pkix.Name, server bool, dns []string, ips []net.IP) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		t := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: subject,
			NotBefore: now, NotAfter: now.Add(25 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			DNSNames:    dns, IPAddresses: ips,
		}
		serial++
		if server {
			t.ExtKeyUsage = append(t.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, t, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(dir+"/"+name+".crt", "CERTIFICATE", der); err != nil {
			return err
		}
		return writeKey(dir+"/"+name+".key", key)
	}
	loop := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	if err := issue("apiserver", pkix.Name{CommonName: "kube-apiserver"}, true,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		append(loop, net.IPv4(10, 0, 0, 1))); err != nil {
		return err
	}
	if err := issue("admin", pkix.Name{CommonName: "keyfs-e2e-admin", Organization: []string{"system:masters"}}, false, nil, nil); err != nil {
		return err
	}
	if err := issue("kubelet", pkix.Name{CommonName: "system:node:" + nodeName}, true, []string{nodeName, "localhost"}, loop); err != nil {
		return err
	}
	if err := issue("kubelet-client", pkix.Name{CommonName: "system:node:" + nodeName, Organization: []string{"system:nodes"}}, false, nil, nil); err != nil {
		return err
	}
	if err := issue("kubelet-b-client", pkix.Name{CommonName: "system:node:" + nodeBName, Organization: []string{"system:nodes"}}, false, nil, nil); err != nil {
		return err
	}
	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if err := writeKey(dir+"/sa.key", sa); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	if err := writePEM(dir+"/sa.pub", "PUBLIC KEY", pub); err != nil {
		return err
	}
	for name, user := range map[string]string{"admin": "admin", "kubelet": "kubelet-client", "kubelet-b": "kubelet-b-client"} {
		if err := h.writeKubeconfig(dir+"/"+name+".kubeconfig", user); err != nil {
			return err
		}
	}
	return nil
}

func (h *harness) writeKubeconfig(file, cert string) error {
	dir := h.path("pki")
	return os.WriteFile(file, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: keyfs-e2e
  cluster: {server: "https://127.0.0.1:%d", certificate-authority: %q}
users:
- name: %s
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: keyfs-e2e
  context: {cluster: keyfs-e2e, user: %s}
current-context: keyfs-e2e
`, h.ports.APIServer, dir+"/ca.crt", cert, dir+"/"+cert+".crt", dir+"/"+cert+".key", cert), 0o600)
}

func writePEM(file, typ string, der []byte) error {
	return os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

func writeKey(file string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	return writePEM(file, "PRIVATE KEY", der)
}
