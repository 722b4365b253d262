# IMAPSieve (dovecot.conf): a message the user moved or copied out of Junk.
# rspamd learns it as ham, unless it went to the Trash (deleted spam says
# nothing) or stays in Junk.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string "${mailbox}" ["Trash", "Junk"] {
  stop;
}
pipe :copy "learn.sh" ["ham"];
