"""The same-port accelerator: kernel sendfile/splice for plain HTTP/1.1 downloads.

The listener on ``KURA_PORT`` buffers each request head, classifies it with
the Klein route table, and either moves an artifact body with the kernel or
hands the connection, with every byte replayed untouched, to twisted.web.

Modules, from the wire inwards:

* :mod:`.protocol`: one connection (``SamePortProtocol``, its ``State``) and
  the listener's factory;
* :mod:`.head`: the strict request-head parser;
* :mod:`.classify`: heads to candidates through the Klein route table;
* :mod:`.decide`: serve or fall back, as pure functions; :mod:`.reasons`:
  the fall-back labels;
* :mod:`.accelerator`: what the connections share (settings, collaborators,
  permits, handle cache, sweeper, meters);
* :mod:`.interfaces`: the transfer engine seam; :mod:`.engine` (kernel
  engine), :mod:`.transfer` (splice/sendfile steps), :mod:`.pipes` (splice
  pipes) behind it; :mod:`.testing`: the fake engine;
* :mod:`.handles`: open descriptors of small artifacts; :mod:`.sweep`: the
  deadline sweeper; :mod:`.meters`: metric children; :mod:`.response`:
  response heads.
"""
