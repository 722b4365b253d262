# IMAPSieve (dovecot.conf): a message the user moved or copied into Junk.
# rspamd learns it as spam.
require ["vnd.dovecot.pipe", "copy", "imapsieve"];

pipe :copy "learn.sh" ["spam"];
