"""
The daemon: the twistd plugin's options and service, and the deliveries it
offers (Maildir, relay and LMTP over the client, the printing sink),
workers and systemd notification.  Stands on the server and the client.
"""
