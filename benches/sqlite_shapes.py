#!/usr/bin/env python3
"""Where the SQLite ceiling comes from: the raw-ceiling writes (per 1,000 transitions one
UPDATE of the run rows, one INSERT of history rows, one INSERT of outbox rows, in one
transaction; prepared multi-row statements with bound parameters) issued from Python's
sqlite3 module -- C bindings, no sqlx -- into the engine's own schema ("wide") and into
narrow tables with no secondary indexes ("narrow"). Prints transitions per second.
Run: python3 benches/sqlite_shapes.py   (see BENCHMARKS.md)
"""
import os, sqlite3, tempfile, time
N=20000; B=1000
def run(schema, hist, out, upd_sql, narrow):
    path=os.path.join(tempfile.mkdtemp(prefix="canvas-shapes-"), "p.db")
    c=sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=NORMAL")
    c.executescript(schema)
    c.execute("BEGIN")
    for i in range(N):
        if narrow: c.execute("INSERT INTO runs VALUES(?,?,?,?)",(f"raw/c{i:08}/1",'pause',1,1))
        else: c.execute("INSERT INTO runs VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",(f"raw/c{i:08}/1",'raw','v1',f"c{i:08}",'waiting','pause',1767225600000,None,'{}','{"id":"e","name":"joined"}','treated',None,None,None,None,1,1767225600000,1767225600000))
    c.execute("COMMIT")
    hw=len(hist(0)); ow=len(out(0))
    hsql="INSERT INTO history VALUES "+",".join(["("+",".join("?"*hw)+")"]*B)
    osql="INSERT INTO outbox VALUES "+",".join(["("+",".join("?"*ow)+")"]*B)
    usql="WITH v(id) AS (VALUES "+",".join(["(?)"]*B)+") "+upd_sql
    t=time.perf_counter()
    for b in range(0,N,B):
        c.execute("BEGIN")
        c.execute(usql,[f"raw/c{i:08}/1" for i in range(b,b+B)])
        c.execute(hsql,[x for i in range(b,b+B) for x in hist(i)])
        c.execute(osql,[x for i in range(b,b+B) for x in out(i)])
        c.execute("COMMIT")
    return N/(time.perf_counter()-t)
wide=open(os.path.join(os.path.dirname(__file__), '..', 'engine/migrations/sqlite/0001_store.sql')).read()
wh=lambda i:(f"raw/c{i:08}/1",2,'raw',f"c{i:08}",'pause',1767225700000,'sent','{"channel":"sms","template":"bench/hello"}')
wo=lambda i:(f"raw/c{i:08}/1/hello",'message',f"raw/c{i:08}/1",'raw',f"c{i:08}",'hello','sms',f"+86138{i:08}",'bench/hello','{"text":"Hi Member, welcome to the club."}',0,1767225700000,'pending',0,1767225700000,None,None)
print("wide  ", int(run(wide, wh, wo, "UPDATE runs SET status='ended', step=NULL, wake_at=NULL, seq=2, outcome='done', updated_at=1767225700000 WHERE id IN (SELECT id FROM v)", False)))
narrow="""CREATE TABLE runs(id TEXT PRIMARY KEY, step TEXT, wake_at INTEGER, seq INTEGER);
CREATE TABLE history(run_id TEXT, seq INTEGER, step TEXT, at INTEGER, PRIMARY KEY(run_id, seq));
CREATE TABLE outbox(key TEXT PRIMARY KEY, payload TEXT);"""
print("narrow", int(run(narrow, lambda i:(f"raw/c{i:08}/1",2,'pause',1), lambda i:(f"raw/c{i:08}/1/hello",'{"text":"Hi"}'), "UPDATE runs SET step=NULL, wake_at=NULL, seq=2 WHERE id IN (SELECT id FROM v)", True)))
