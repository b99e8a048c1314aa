#!/usr/bin/env python3
"""Independent cross-check of kiln's sealed secrets and keys, with Python `cryptography`.

It shares no code with kiln: it re-implements the bitnami sealed-secrets format from its
specification (pkg/crypto/crypto.go) so a bug in kiln's Rust cannot hide in both sides.

Usage:
  seal_crosscheck.py SEALED.yaml PRIVATE-KEY.pem EXPECTED-SECRET.yaml [--scope SCOPE]
      Decrypt every spec.encryptedData value of the SealedSecret the way the controller does
      (OAEP label from the SealedSecret's metadata and scope annotations) and compare with the
      expected Secret's data (base64) merged with stringData (stringData wins). Also checks the
      byte layout, the metadata and the template. SCOPE (strict | namespace-wide | cluster-wide)
      is the scope the SealedSecret must have; default: the expected Secret's annotations.
  seal_crosscheck.py --seal SECRET.yaml CERT.pem [--scope SCOPE]
      Seal a Secret here, in Python, and print the SealedSecret (JSON, which is YAML): lets the
      Rust side prove it decrypts what an independent implementation encrypted.
  seal_crosscheck.py --check-keys KEYS-DIR
      Validate every file of `kiln keys init` (formats, modes, key/certificate match, the
      certificate's self-signature) and print their fingerprints as JSON, computed here.

Exit status: 0 all good; 1 a check failed (messages on stderr); 2 usage or unreadable input.
Needs the `cryptography` and `yaml` (PyYAML) modules.
"""

import base64
import hashlib
import json
import os
import re
import stat
import struct
import sys

try:
    import yaml
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError as e:  # pragma: no cover - environment problem
    print(f"seal_crosscheck: missing Python module: {e} (pip install cryptography pyyaml)",
          file=sys.stderr)
    sys.exit(2)

NS_WIDE = "sealedsecrets.bitnami.com/namespace-wide"
CLUSTER_WIDE = "sealedsecrets.bitnami.com/cluster-wide"
LAST_APPLIED = (
    "kubectl.kubernetes.io/last-applied-configuration",
    "kubecfg.ksonnet.io/last-applied-configuration",
)
SCOPES = ("strict", "namespace-wide", "cluster-wide")

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)


def usage(msg):
    print(f"seal_crosscheck: {msg}\n\n{__doc__}", file=sys.stderr)
    sys.exit(2)


def load_doc(path):
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        usage(f"cannot read {path}: {e}")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        usage(f"{path}: expected exactly one Kubernetes object")
    return docs[0]


def scope_of(annotations):
    annotations = annotations or {}
    if annotations.get(CLUSTER_WIDE) == "true":
        return "cluster-wide"
    if annotations.get(NS_WIDE) == "true":
        return "namespace-wide"
    return "strict"


def label_for(scope, namespace, name):
    if scope == "cluster-wide":
        return b""
    if scope == "namespace-wide":
        return namespace.encode()
    return f"{namespace}/{name}".encode()


def oaep(label):
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()),
                        algorithm=hashes.SHA256(), label=label or None)


def hybrid_decrypt(key, blob, label):
    if len(blob) < 2:
        raise ValueError("too short")
    (rsa_len,) = struct.unpack(">H", blob[:2])
    if len(blob) < 2 + rsa_len:
        raise ValueError("length prefix past the end")
    session = key.decrypt(blob[2:2 + rsa_len], oaep(label))
    return AESGCM(session).decrypt(b"\x00" * 12, blob[2 + rsa_len:], None)


def hybrid_encrypt(pub, plaintext, label):
    session = os.urandom(32)
    rsa_ct = pub.encrypt(session, oaep(label))
    gcm = AESGCM(session).encrypt(b"\x00" * 12, plaintext, None)
    return struct.pack(">H", len(rsa_ct)) + rsa_ct + gcm


def secret_values(secret):
    values = {}
    for k, v in (secret.get("data") or {}).items():
        values[k] = base64.b64decode("".join((v or "").split()), validate=True)
    for k, v in (secret.get("stringData") or {}).items():
        values[k] = (v or "").encode()
    return values


def load_private_key(path):
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as e:
        usage(f"cannot load private key {path}: {e}")
    if not isinstance(key, rsa.RSAPrivateKey):
        usage(f"{path} is not an RSA private key")
    return key


def check_sealed(sealed_path, key_path, expected_path, want_scope):
    sealed = load_doc(sealed_path)
    expected = load_doc(expected_path)
    key = load_private_key(key_path)

    if sealed.get("apiVersion") != "bitnami.com/v1alpha1":
        fail(f"apiVersion is {sealed.get('apiVersion')!r}, want bitnami.com/v1alpha1")
    if sealed.get("kind") != "SealedSecret":
        fail(f"kind is {sealed.get('kind')!r}, want SealedSecret")
    meta = sealed.get("metadata") or {}
    emeta = expected.get("metadata") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace") or ""
    if name != emeta.get("name"):
        fail(f"metadata.name {name!r} != expected {emeta.get('name')!r}")
    if emeta.get("namespace") and namespace != emeta.get("namespace"):
        fail(f"metadata.namespace {namespace!r} != expected {emeta.get('namespace')!r}")

    scope = scope_of(meta.get("annotations"))
    want_scope = want_scope or scope_of(emeta.get("annotations"))
    if scope != want_scope:
        fail(f"SealedSecret scope is {scope}, want {want_scope}")
    extra = set((meta.get("annotations") or {})) - {NS_WIDE, CLUSTER_WIDE}
    if extra:
        fail(f"unexpected SealedSecret annotations {sorted(extra)}")
    label = label_for(scope, namespace, name)

    spec = sealed.get("spec") or {}
    tmpl = spec.get("template") or {}
    tmeta = tmpl.get("metadata") or {}
    if tmeta.get("name") != name:
        fail(f"template.metadata.name {tmeta.get('name')!r} != {name!r}")
    if (tmeta.get("namespace") or "") != namespace:
        fail(f"template.metadata.namespace {tmeta.get('namespace')!r} != {namespace!r}")
    if (tmeta.get("labels") or {}) != (emeta.get("labels") or {}):
        fail(f"template labels {tmeta.get('labels')} != expected {emeta.get('labels')}")
    tanno = tmeta.get("annotations") or {}
    for a in LAST_APPLIED:
        if a in tanno:
            fail(f"template keeps {a}: it leaks the secret in clear")
    for k, v in (emeta.get("annotations") or {}).items():
        if k not in LAST_APPLIED and k not in (NS_WIDE, CLUSTER_WIDE) and tanno.get(k) != v:
            fail(f"template annotation {k} is {tanno.get(k)!r}, want {v!r}")
    if scope_of(tanno) != scope:
        fail(f"template scope annotations say {scope_of(tanno)}, metadata says {scope}")
    if tmpl.get("type") != expected.get("type"):
        fail(f"template.type {tmpl.get('type')!r} != expected {expected.get('type')!r}")

    want = secret_values(expected)
    got = spec.get("encryptedData") or {}
    if sorted(got) != sorted(want):
        fail(f"encryptedData keys {sorted(got)} != expected {sorted(want)}")
    key_bytes = key.key_size // 8
    for k in sorted(set(got) & set(want)):
        try:
            blob = base64.b64decode(got[k], validate=True)
        except ValueError as e:
            fail(f"encryptedData.{k}: bad base64: {e}")
            continue
        (rsa_len,) = struct.unpack(">H", blob[:2])
        if rsa_len != key_bytes:
            fail(f"encryptedData.{k}: RSA block is {rsa_len} bytes, key is {key_bytes}")
        if len(blob) != 2 + key_bytes + len(want[k]) + 16:
            fail(f"encryptedData.{k}: {len(blob)} bytes, want 2+{key_bytes}+{len(want[k])}+16")
        try:
            plain = hybrid_decrypt(key, blob, label)
        except Exception as e:  # noqa: BLE001 - report any failure
            fail(f"encryptedData.{k}: cannot decrypt with label {label!r}: {e!r}")
            continue
        if plain != want[k]:
            fail(f"encryptedData.{k}: decrypted {plain!r}, want {want[k]!r}")
        # The label binds the scope: no other scope's label may open it.
        for other in SCOPES:
            other_label = label_for(other, namespace, name)
            if other_label == label:
                continue
            try:
                hybrid_decrypt(key, blob, other_label)
                fail(f"encryptedData.{k} also decrypts with the {other} label {other_label!r}")
            except Exception:  # noqa: BLE001 - expected
                pass
    if failures:
        return 1
    print(f"OK: {len(got)} value(s) decrypted, scope {scope}, label {label.decode()!r}")
    return 0


def seal(secret_path, cert_path, scope_override):
    secret = load_doc(secret_path)
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        usage(f"cannot load certificate {cert_path}: {e}")
    pub = cert.public_key()
    meta = secret.get("metadata") or {}
    name, namespace = meta["name"], meta.get("namespace") or ""
    annotations = dict(meta.get("annotations") or {})
    for a in LAST_APPLIED:
        annotations.pop(a, None)
    scope = scope_override or scope_of(annotations)
    annotations.pop(NS_WIDE, None)
    annotations.pop(CLUSTER_WIDE, None)
    scope_anno = {}
    if scope == "namespace-wide":
        scope_anno = {NS_WIDE: "true"}
    elif scope == "cluster-wide":
        scope_anno = {CLUSTER_WIDE: "true"}
    annotations.update(scope_anno)
    label = label_for(scope, namespace, name)
    enc = {k: base64.b64encode(hybrid_encrypt(pub, v, label)).decode()
           for k, v in sorted(secret_values(secret).items())}
    out_meta = {"name": name}
    tmeta = {"name": name}
    if namespace:
        out_meta["namespace"] = namespace
        tmeta["namespace"] = namespace
    if scope_anno:
        out_meta["annotations"] = scope_anno
    if meta.get("labels"):
        tmeta["labels"] = meta["labels"]
    if annotations:
        tmeta["annotations"] = annotations
    template = {"metadata": tmeta}
    if secret.get("type"):
        template["type"] = secret["type"]
    doc = {"apiVersion": "bitnami.com/v1alpha1", "kind": "SealedSecret", "metadata": out_meta,
           "spec": {"encryptedData": enc, "template": template}}
    print(json.dumps(doc, indent=2))
    return 0


def ssh_fingerprint(blob):
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ssh_string(b):
    return struct.pack(">I", len(b)) + b


def ssh_mpint(n):
    b = n.to_bytes((n.bit_length() + 8) // 8, "big")  # leading zero byte if the top bit is set
    return ssh_string(b)


def check_keys(keys_dir):
    p = lambda name: os.path.join(keys_dir, name)  # noqa: E731
    out = {}

    def mode_is(name, want):
        try:
            m = stat.S_IMODE(os.stat(p(name)).st_mode)
        except OSError as e:
            fail(f"{name}: {e}")
            return
        if m != want:
            fail(f"{name}: mode {m:04o}, want {want:04o}")

    for name in ("ssh_ed25519", "signing_ed25519.pem", "sealed-secrets.key", "k3s-token"):
        mode_is(name, 0o600)
    for name in ("ssh_ed25519.pub", "authorized_keys", "signing_ed25519.pub",
                 "sealed-secrets.crt", ".gitignore"):
        mode_is(name, 0o644)

    def read(name):
        with open(p(name), "rb") as f:
            return f.read()

    try:
        # SSH: OpenSSH private key, its public line, authorized_keys.
        sk = serialization.load_ssh_private_key(read("ssh_ed25519"), password=None)
        if not isinstance(sk, ed25519.Ed25519PrivateKey):
            fail("ssh_ed25519 is not an Ed25519 key")
        pub_line = read("ssh_ed25519.pub").decode()
        ours = sk.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode()
        fields = pub_line.split()
        if " ".join(fields[:2]) != ours:
            fail("ssh_ed25519.pub does not match ssh_ed25519")
        if len(fields) != 3 or not fields[2].startswith("kiln@"):
            fail(f"ssh_ed25519.pub comment is not kiln@<cluster>: {pub_line!r}")
        if read("authorized_keys").decode() != pub_line:
            fail("authorized_keys differs from ssh_ed25519.pub")
        out["ssh"] = ssh_fingerprint(base64.b64decode(fields[1]))

        # Signing: PKCS#8 PEM Ed25519 + raw public key base64.
        sig = serialization.load_pem_private_key(read("signing_ed25519.pem"), password=None)
        if not isinstance(sig, ed25519.Ed25519PrivateKey):
            fail("signing_ed25519.pem is not an Ed25519 key")
        raw = sig.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        if base64.b64decode(read("signing_ed25519.pub").strip(), validate=True) != raw:
            fail("signing_ed25519.pub does not match signing_ed25519.pem")
        msg = b"kiln crosscheck"
        sig.public_key().verify(sig.sign(msg), msg)
        out["signing"] = hashlib.sha256(raw).hexdigest()

        # Sealed secrets: RSA key, self-signed certificate.
        key_pem = read("sealed-secrets.key")
        if not key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----"):
            fail("sealed-secrets.key is not PKCS#1 PEM")
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert_pem = read("sealed-secrets.crt")
        cert = x509.load_pem_x509_certificate(cert_pem)
        cpub = cert.public_key()
        if not isinstance(cpub, rsa.RSAPublicKey):
            fail("sealed-secrets.crt does not hold an RSA key")
        elif cpub.public_numbers() != key.public_key().public_numbers():
            fail("sealed-secrets.crt does not match sealed-secrets.key")
        cpub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                    cert.signature_hash_algorithm)
        if cert.signature_hash_algorithm.name != "sha256":
            fail(f"certificate hash is {cert.signature_hash_algorithm.name}, want sha256")
        if cert.subject != cert.issuer:
            fail("certificate is not self-signed (subject != issuer)")
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if [a.value for a in cns] != ["sealed-secret"]:
            fail(f"certificate CN is {[a.value for a in cns]}, want sealed-secret")
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
        days = (na - nb).total_seconds() / 86400
        if not 3650 <= days <= 3651:
            fail(f"certificate validity is {days:.2f} days, want 10 years")
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            fail("certificate basicConstraints is not CA:TRUE")
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not (ku.digital_signature and ku.key_encipherment):
            fail("certificate keyUsage lacks digitalSignature/keyEncipherment")
        if cert.serial_number <= 0:
            fail("certificate serial is not positive")
        der = cert.public_bytes(serialization.Encoding.DER)
        out["cert"] = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        n = key.public_key().public_numbers()
        out["sealed_key"] = ssh_fingerprint(ssh_string(b"ssh-rsa") + ssh_mpint(n.e)
                                            + ssh_mpint(n.n))
        out["rsa_bits"] = key.key_size

        token = read("k3s-token").decode()
        if not re.fullmatch(r"[0-9a-f]{64}\n", token):
            fail("k3s-token is not 64 lowercase hex characters and a newline")
    except (OSError, ValueError) as e:
        fail(f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - e.g. InvalidSignature
        fail(f"{type(e).__name__}: {e}")
    if failures:
        return 1
    print(json.dumps(out, indent=2))
    return 0


def take_scope(args):
    if "--scope" in args:
        i = args.index("--scope")
        if i + 1 >= len(args) or args[i + 1] not in SCOPES:
            usage(f"--scope needs one of {', '.join(SCOPES)}")
        scope = args[i + 1]
        del args[i:i + 2]
        return scope
    return None


def main(argv):
    args = list(argv[1:])
    scope = take_scope(args)
    if len(args) == 3 and args[0] == "--seal":
        return seal(args[1], args[2], scope)
    if len(args) == 2 and args[0] == "--check-keys":
        return check_keys(args[1])
    if len(args) == 3 and not args[0].startswith("-"):
        return check_sealed(args[0], args[1], args[2], scope)
    usage("bad arguments")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
