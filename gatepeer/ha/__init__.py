"""High availability on keepalived: render its config from `[ha]`, read its state changes from
the notify FIFO, claim the gateway on MASTER, and the health check it runs (`gatepeer check`).

The election itself is keepalived's; nothing here decides who is master.
"""
