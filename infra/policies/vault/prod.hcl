# Vault / OpenBao policy "makini-rotator-prod": the prod rotator's whole reach, and nothing of any
# other environment. KV v2 mounted at secret/; every path stays under makini/prod/.
#
#   bao policy write makini-rotator-prod infra/policies/vault/prod.hcl
#   bao write auth/kubernetes/role/makini-rotator-prod \
#       bound_service_account_names=makini-rotator-prod \
#       bound_service_account_namespaces=makini-rotator-prod \
#       audience=vault token_policies=makini-rotator-prod token_ttl=15m token_max_ttl=1h
#
# (The pod logs in with the projected token at /var/run/secrets/vault/token, audience "vault".)

# Versions: write new ones (check-and-set), read current and previous, soft-delete the latest.
path "secret/data/makini/prod/*" {
  capabilities = ["create", "read", "update"]
}

# Metadata: list the environment's credentials and versions, set stage labels and
# cas_required (custom_metadata), delete a credential with all its versions.
# create: the first version of a credential creates its metadata; patch: each step records
# its version's stage with a JSON merge-patch of custom_metadata (never a read-modify-write)
path "secret/metadata/makini/prod/*" {
  capabilities = ["create", "read", "list", "update", "patch", "delete"]
}

# Retire and purge: make a version unreadable for good (destroy), or soft-delete given versions.
path "secret/destroy/makini/prod/*" {
  capabilities = ["update"]
}

