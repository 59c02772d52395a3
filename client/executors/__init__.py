"""Executors: the I/O under the client core — one driver loop each, and their connections.

``trio_executor.py`` + ``trio_connection.py`` run operations as trio tasks
(``Client``); ``blocking_executor.py`` + ``blocking_connection.py`` run them
on the caller's thread (``SyncClient``, and the tools' node-to-node calls).
"""
