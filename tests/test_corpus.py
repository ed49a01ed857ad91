"""Text extractors of the offline Debian corpus (hybrid/markup.py, roff.py, sword.py, corpus.py): tiny inputs."""

import gzip
import os
import struct
import zlib

from hybrid import corpus
from hybrid.markup import pod_to_text
from hybrid.roff import roff_to_text

MAN_PAGE = r""".\" Copyright line, a comment
'\" t
.de XX
.  this macro definition is dropped
..
.TH SIGNAL 7 2023-02-05 "Linux man-pages"
.SH NAME
signal \- overview of signals
.SH DESCRIPTION
Linux supports
.I reliable
signals (see
.BR sigaction (2)).
Each signal has a \fBdisposition\fP, \(lqTerm\(rq or \[lq]Ign\[rq].
.PP
Second paragraph\(emwith a dash.
.TP 10
.B SIGINT
Interrupt from keyboard.
.SS Example
.EX
int main(void)
{
    return 0;
}
.EE
After the example.
"""


def test_roff_man_macros():
    text = roff_to_text(MAN_PAGE)
    assert "Copyright" not in text and "macro definition" not in text and "SIGNAL 7" not in text
    assert text.startswith("NAME\n\nsignal - overview of signals\n\nDESCRIPTION\n\n")
    assert ("Linux supports reliable signals (see sigaction(2)). Each signal has a disposition, "
            "\u201cTerm\u201d or \u201cIgn\u201d.") in text
    assert "Second paragraph\u2014with a dash." in text
    assert "with a dash.\n\nSIGINT\n\nInterrupt from keyboard." in text  # a .TP label on its own line
    assert "Example\n\nint main(void)\n{\n    return 0;\n}\n\nAfter the example." in text  # .EX kept line by line
    assert roff_to_text(".so man3/other.3\n") == ""  # an alias page: left out


MDOC_PAGE = """.Dd August 28, 2020
.Dt MALLOC 9
.Os
.Sh NAME
.Nm malloc ,
.Nm free
.Nd kernel memory management routines
.Sh SYNOPSIS
.In sys/malloc.h
.Ft void *
.Fn malloc "size_t size" "int flags"
.Sh DESCRIPTION
The
.Fn malloc
function allocates memory of
.Fa size
bytes; see
.Xr numa 4 .
Run
.Nm ls Fl l Ar file
or
.Dq Li quoted text .
.Pp
.Bl -tag -width indent
.It Dv M_ZERO
Zero the memory.
.El
"""


def test_roff_mdoc_macros():
    text = roff_to_text(MDOC_PAGE)
    assert "MALLOC 9" not in text and "August" not in text
    assert text.startswith("NAME\n\nmalloc, free \u2014 kernel memory management routines\n\nSYNOPSIS\n\n")
    assert "#include <sys/malloc.h>\n\nvoid * malloc(size_t size, int flags)" in text
    assert "The malloc() function allocates memory of size bytes; see numa(4). Run ls -l file" in text
    assert "or \u201cquoted text\u201d." in text
    assert "M_ZERO\n\nZero the memory." in text


POD = """=head1 NAME

perlop - Perl operators

=head2 Operator Precedence

Operators like B<and> and C<< $a <=> $b >> group; see L<perlfunc/sort> and
L<the manual|perlsyn>. E<lt>tagE<gt> and I<nested B<codes>>.X<index entry> CafE<eacute> E<0x263A>E<0101>E<66>.

    my $x = 1 + 2;
    print $x;

=over 4

=item *

A bullet item.

=item B<-e> I<code>

Runs code.

=back

=begin html

<p>dropped</p>

=end html

=cut

sub code_after_cut { }

=pod

Back in POD.
"""


def test_pod():
    text = pod_to_text(POD)
    assert text.startswith("NAME\n\nperlop - Perl operators\n\nOperator Precedence\n\n")
    assert "Operators like and and $a <=> $b group; see sort and the manual. <tag> and nested codes." in text
    assert "Caf\u00e9 \u263aAB.\n\n" in text  # entities: named, hex, octal, decimal
    assert "    my $x = 1 + 2;\n    print $x;" in text  # verbatim kept
    assert "A bullet item.\n\n-e code\n\nRuns code." in text
    assert "dropped" not in text and "code_after_cut" not in text and "index entry" not in text
    assert text.endswith("Back in POD.")


def test_file_docs_gz_symlinks_skip(tmp_path):
    page = "Some text long enough to keep. " * 10
    (tmp_path / "man1").mkdir()
    with gzip.open(tmp_path / "man1" / "a.1.gz", "wt") as f:
        f.write(".SH NAME\n" + page)
    os.symlink("a.1.gz", tmp_path / "man1" / "alias.1.gz")  # Debian links aliases to the page
    (tmp_path / "man1" / "b.1").write_text(".SH NAME\n" + page)
    (tmp_path / "man1" / "short.1").write_text(".SH NAME\nshort\n")
    docs = dict(corpus.man_docs(str(tmp_path), "man*/*", r"^man1/b\."))
    assert list(docs) == ["man1/a.1.gz"]  # alias link, skipped name and too-short page left out
    assert docs["man1/a.1.gz"].startswith("NAME\n\nSome text")


def test_ztext_chapter_blocks_wide_sizes(tmp_path):
    """zCom4: chapter blocks (.czs/.czv/.czz), uint32 verse sizes, several verses sharing one entry."""
    entry = "<p>Commentary on verses one to three, long enough to count as a document.</p>" * 4
    raw = entry.encode()
    comp = zlib.compress(raw)
    (tmp_path / "ot.czs").write_bytes(struct.pack("<III", 0, len(comp), len(raw)))
    (tmp_path / "ot.czz").write_bytes(comp)
    idx = struct.pack("<III", 0, 0, 0) + struct.pack("<III", 0, 0, len(raw)) * 3  # 3 verses -> the same span
    (tmp_path / "ot.czv").write_bytes(idx)
    docs = list(corpus.ztext_docs(str(tmp_path), wide=True))
    assert len(docs) == 1 and docs[0][0] == "ot/000"
    assert docs[0][1].count("Commentary on verses") == 4  # counted once, not three times


def test_html_docs_site_marks(tmp_path):
    page = ('<html><body><div class="header"><div class="navigationbar">Home &gt; Classes</div>'
            '<h1>QString</h1><p>' + "The QString class provides a Unicode string. " * 6 + '</p>'
            '<div id="deref-methods-T-1"><p>Methods copied from the slice type.</p></div>'
            '<table class="alignedsummary"><tr><td>int size() const</td></tr></table></div></body></html>')
    (tmp_path / "qstring.html").write_text(page)
    plain = dict(corpus.html_docs(str(tmp_path), "*.html"))
    assert plain == {}  # the default drops the never-closed header <div>, and with it the whole page
    docs = dict(corpus.html_docs(str(tmp_path), "*.html", add_marks=("navigationbar", "alignedsummary"),
                                 keep_marks=("header",), skip_prefixes=("deref-methods-",)))
    text = docs["qstring.html"]
    assert text.startswith("QString\n\nThe QString class provides a Unicode string.")
    assert "Home" not in text and "copied" not in text and "size()" not in text


def test_debian_documents_drops_duplicates(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    (root / "doc").mkdir(parents=True)
    body = "A page of documentation text, long enough to be kept. " * 5
    (root / "doc" / "a.txt").write_text(body)
    (root / "doc" / "b.txt").write_text(body.replace(". ", ".\n  "))  # the same text, other whitespace
    (root / "doc" / "c.txt").write_text(body.upper())
    monkeypatch.setattr(corpus, "fetch_deb", lambda pkg, cache: {"package": pkg, "version": "1", "root": str(root)})
    monkeypatch.setitem(corpus.DEBIAN_SOURCES, "pkg:part", (corpus.text_files, "doc", dict(pattern="*.txt")))
    info, docs = corpus.debian_documents("pkg:part", str(tmp_path))
    assert info == {"package": "pkg", "version": "1"}  # the package part of the name is fetched
    assert [d for d, _ in docs] == ["a.txt", "c.txt"]


def test_roff_heading_on_next_line():
    text = roff_to_text(".SH\nNAME\nfoo \\- do things\n.SH DESCRIPTION\nText.\n")
    assert text == "NAME\n\nfoo - do things\n\nDESCRIPTION\n\nText."
