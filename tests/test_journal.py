"""The sent-journal on real files: what it keeps, and that emptying it never drops an unrecorded send."""

from interface_engine.store.journal import SentJournal


def journal(tmp_path, limit=16) -> SentJournal:
    j = SentJournal(str(tmp_path / "store.db-sent-n1"))
    j.LIMIT = limit   # two entries a generation
    j.open()
    return j


def test_a_generation_is_emptied_only_once_every_entry_in_it_is_recorded(tmp_path):
    j = journal(tmp_path)
    assert [j.sent(1), j.sent(2)] == [0, 0]
    assert j.sent(3) == 1                 # the first generation is full: the other takes over
    assert j.sent(4) == 1
    assert j.sent(5) == 1                 # both full, but 1 and 2 are not recorded: keep appending
    assert sorted(j.entries()) == [1, 2, 3, 4, 5]
    j.recorded(0)
    j.recorded(0)
    assert j.sent(6) == 0                 # now the first generation may be emptied and reused
    assert sorted(j.entries()) == [3, 4, 5, 6]


def test_a_clean_close_leaves_it_empty_and_an_unclean_one_keeps_what_is_unrecorded(tmp_path):
    j = journal(tmp_path, limit=1 << 20)
    generation = j.sent(7)
    j.recorded(generation)
    j.close()
    assert j.entries() == []
    j.open()
    j.sent(8)
    j.close()
    assert j.entries() == [8]
    assert j.sent(9) is None              # closed: the caller waits for the record instead


def test_a_torn_last_entry_is_ignored_and_open_starts_empty(tmp_path):
    j = SentJournal(str(tmp_path / "store.db-sent-n1"))
    (tmp_path / "store.db-sent-n1.0").write_bytes((41).to_bytes(8, "little") + b"\x01\x02\x03")
    assert j.entries() == [41]
    j.open()
    assert j.entries() == []
    assert oct((tmp_path / "store.db-sent-n1.1").stat().st_mode & 0o777) == "0o600"


def test_there_is_a_journal_only_beside_a_sqlite_file():
    assert SentJournal.for_store("sqlite:///var/store.db", "a").paths == ("var/store.db-sent-a.0",
                                                                          "var/store.db-sent-a.1")
    assert SentJournal.for_store("sqlite:///:memory:", "a") is None
    assert SentJournal.for_store("postgresql+psycopg://u@h/db", "a") is None
