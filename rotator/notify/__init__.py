"""Notifications for what someone must act on: a rotation failed or rolled back, attention on a
credential, a token near expiry without a successful rotation, an emergency revoke started,
finished or unconfirmed, backends that disagree.

``settings`` (the configuration's ``notify`` table), ``notice`` (what one notification says),
``outbox`` (the journal's tables: conditions and the delivery queue), ``sinks`` (webhook, Slack,
Alertmanager) and ``notifier`` (evaluates the conditions, listens to the engine, delivers).
Nothing is imported here: the configuration imports ``settings`` from below the other modules'
layer.
"""
