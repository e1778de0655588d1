"""The same-port accelerator: kernel sendfile/splice for plain HTTP/1.1 downloads.

The listener on ``KURA_PORT`` buffers each request head, classifies it with
the Klein route table, and either moves an artifact body with the kernel or
hands the connection, with every byte replayed untouched, to twisted.web.
"""
